"""The ``-cfg`` configuration dialog: four tabs, as the base product had.

* **Status**: stopped, primary or secondary, with a coloured icon (which also
  colours the window's own icon), the node's status, and a Start/Stop button.
* **Configure**: local and remote address, port, period, primary-only,
  backup-only, strict sync, keep timestamps.
* **Email**: enable, SMTP server, port, security, account, password, sender,
  recipients, and a Test button that sends a mail with what is typed and shows
  the result.
* **Folders**: filter + path rows, Add and Remove.

While the service runs only Status can be used: the configuration of a running
node is not changed under it. Save checks everything with the node's own loader
and writes nothing unless all of it is valid; each problem is shown next to its
field (:mod:`sbs_winsvc.cfg.form`). The file keeps its comments.

Tk only, from the standard library: it runs wherever Python has Tk (Windows,
and Linux/macOS against ``sbs run``).
"""

from __future__ import annotations

import queue
import sys
import threading
import tkinter as tk
from collections.abc import Callable
from pathlib import Path
from tkinter import filedialog, ttk
from typing import Any, Final

from sbs_core.errors import SbsError
from sbs_winsvc.cfg.backend import ProcessBackend, ServiceBackend, ServiceState
from sbs_winsvc.cfg.form import GENERAL, ConfigForm, FormValues

__all__ = ("ROLE_COLOURS", "ConfigDialog", "run_dialog")

ROLE_COLOURS: Final[dict[str, str]] = {
    "primary": "#2e7d32",  # green
    "secondary": "#f9a825",  # amber
    "stopped": "#c62828",  # red
    "busy": "#9e9e9e",  # grey: starting, stopping, handing over, unknown
}
_ICON_SIZE: Final = 32
_LOCKED_TABS: Final = (1, 2, 3)

StatusSource = Callable[[Path], dict[str, Any]]


def _node_status(config_file: Path) -> dict[str, Any]:
    from sbs_core.cli import node_status  # noqa: PLC0415 - keeps start-up light
    from sbs_core.config import load_config  # noqa: PLC0415

    return node_status(load_config(config_file))


def _format_status(status: dict[str, Any]) -> str:
    from sbs_core.cli import format_status  # noqa: PLC0415

    text = format_status(status)
    if status.get("sentinels_held"):
        text += (
            f"\nheld       {', '.join(status['sentinels_held'])}:"
            f" {status.get('sentinels_held_reason')}"
        )
    licence = status.get("licence")
    if isinstance(licence, dict):
        text += f"\nlicence    {licence.get('summary')}"
    return text


class ConfigDialog:
    """The dialog in ``root``, for ``config_file``, driving ``backend``."""

    def __init__(
        self,
        root: tk.Tk,
        config_file: Path,
        backend: ServiceBackend,
        *,
        status_source: StatusSource = _node_status,
        poll_ms: int = 1000,
    ) -> None:
        self.root = root
        self.config_file = config_file
        self.backend = backend
        self.form = ConfigForm(config_file)
        self._status_source = status_source
        self._poll_ms = poll_ms
        self._results: queue.Queue[tuple[str, str]] = queue.Queue()
        self.service_state: ServiceState = "stopped"
        self.role = "stopped"
        self.colour = ROLE_COLOURS["stopped"]

        root.title(f"sbs configuration - {config_file}")
        root.minsize(640, 460)
        self.text_vars: dict[str, tk.StringVar] = {}
        self.flag_vars: dict[str, tk.BooleanVar] = {}
        self.error_labels: dict[str, ttk.Label] = {}
        self.entries: dict[str, ttk.Entry | ttk.Combobox] = {}

        self.notebook = ttk.Notebook(root)
        self.notebook.pack(fill="both", expand=True, padx=8, pady=(8, 4))
        self._build_status()
        self._build_configure()
        self._build_email()
        self._build_folders()
        self._build_buttons()

        self.icon_image = tk.PhotoImage(master=root, width=_ICON_SIZE, height=_ICON_SIZE)
        self.load(self.form.values())
        self.refresh()
        if poll_ms > 0:
            root.after(poll_ms, self._poll)
        root.after(100, self._drain_results)

    # ------------------------------------------------------------------ building

    def _tab(self, title: str) -> ttk.Frame:
        frame = ttk.Frame(self.notebook, padding=10)
        self.notebook.add(frame, text=title)
        frame.columnconfigure(1, weight=1)
        return frame

    def _entry(
        self, parent: ttk.Frame, row: int, name: str, label: str, *, secret: bool = False
    ) -> ttk.Entry:
        ttk.Label(parent, text=label).grid(row=row, column=0, sticky="w", pady=2)
        var = tk.StringVar(master=self.root)
        entry = ttk.Entry(parent, textvariable=var, show="*" if secret else "")
        entry.grid(row=row, column=1, sticky="ew", pady=2)
        self.text_vars[name] = var
        self.entries[name] = entry
        self._error_label(parent, row, name)
        return entry

    def _flag(
        self, parent: ttk.Frame, row: int, name: str, label: str, **options: Any
    ) -> ttk.Checkbutton:
        var = tk.BooleanVar(master=self.root)
        check = ttk.Checkbutton(parent, text=label, variable=var, **options)
        check.grid(row=row, column=0, columnspan=2, sticky="w", pady=2)
        self.flag_vars[name] = var
        self._error_label(parent, row, name)
        return check

    def _error_label(self, parent: ttk.Frame, row: int, name: str) -> None:
        label = ttk.Label(parent, text="", foreground="#c62828", wraplength=260)
        label.grid(row=row, column=2, sticky="w", padx=(8, 0))
        self.error_labels[name] = label

    def _build_status(self) -> None:
        tab = self._tab("Status")
        self.icon_canvas = tk.Canvas(tab, width=48, height=48, highlightthickness=0)
        self.icon_canvas.grid(row=0, column=0, rowspan=2, sticky="nw")
        self.icon_dot = self.icon_canvas.create_oval(4, 4, 44, 44, fill=self.colour, outline="")
        self.role_label = ttk.Label(tab, text="STOPPED", font=("TkDefaultFont", 16, "bold"))
        self.role_label.grid(row=0, column=1, sticky="w", padx=8)
        self.state_label = ttk.Label(tab, text="")
        self.state_label.grid(row=1, column=1, sticky="w", padx=8)
        self.start_stop = ttk.Button(tab, text="Start", command=self.toggle_service)
        self.start_stop.grid(row=0, column=2, sticky="ne")
        self.detail = tk.Text(tab, height=12, width=80, relief="flat", font="TkFixedFont")
        self.detail.grid(row=2, column=0, columnspan=3, sticky="nsew", pady=(10, 0))
        self.detail.configure(state="disabled")
        tab.rowconfigure(2, weight=1)

    def _build_configure(self) -> None:
        tab = self._tab("Configure")
        self._entry(tab, 0, "local_address", "Local address")
        self._entry(tab, 1, "remote_address", "Remote address")
        self._entry(tab, 2, "port", "Port")
        self._entry(tab, 3, "period", "Period (seconds)")
        self._flag(
            tab, 4, "primary_only", "Primary only", command=lambda: self._exclusive("primary_only")
        )
        self._flag(
            tab, 5, "backup_only", "Backup only", command=lambda: self._exclusive("backup_only")
        )
        self._flag(tab, 6, "strict_sync", "Strict sync (delete on the secondary too)")
        self._flag(tab, 7, "preserve_timestamps", "Keep timestamps")

    def _exclusive(self, chosen: str) -> None:
        other = "backup_only" if chosen == "primary_only" else "primary_only"
        if self.flag_vars[chosen].get():
            self.flag_vars[other].set(False)

    def _build_email(self) -> None:
        tab = self._tab("Email")
        self._flag(tab, 0, "email_enabled", "Send emails")
        self._entry(tab, 1, "email_host", "SMTP server")
        self._entry(tab, 2, "email_port", "Port")
        ttk.Label(tab, text="Security").grid(row=3, column=0, sticky="w", pady=2)
        security = tk.StringVar(master=self.root)
        box = ttk.Combobox(
            tab, textvariable=security, values=("none", "starttls", "ssl"), state="readonly"
        )
        box.grid(row=3, column=1, sticky="ew", pady=2)
        self.text_vars["email_security"] = security
        self.entries["email_security"] = box
        self._error_label(tab, 3, "email_security")
        self._entry(tab, 4, "email_username", "Account")
        self._entry(tab, 5, "email_password", "Password", secret=True)
        ttk.Label(tab, text="(empty: keep the current one)", foreground="#666666").grid(
            row=6, column=1, sticky="w"
        )
        self._entry(tab, 7, "email_sender", "Sender")
        self._entry(tab, 8, "email_recipients", "Recipients (comma separated)")
        self.test_button = ttk.Button(tab, text="Test", command=self.test_email)
        self.test_button.grid(row=9, column=0, sticky="w", pady=(10, 0))
        self.test_result = ttk.Label(tab, text="", wraplength=420)
        self.test_result.grid(row=9, column=1, columnspan=2, sticky="w", pady=(10, 0))

    def _build_folders(self) -> None:
        tab = self._tab("Folders")
        self.folder_tree = ttk.Treeview(
            tab, columns=("filter", "path"), show="headings", height=8, selectmode="browse"
        )
        self.folder_tree.heading("filter", text="Filter")
        self.folder_tree.heading("path", text="Path")
        self.folder_tree.column("filter", width=100, stretch=False)
        self.folder_tree.grid(row=0, column=0, columnspan=4, sticky="nsew")
        tab.rowconfigure(0, weight=1)
        tab.columnconfigure(1, weight=1)
        self.folder_filter = tk.StringVar(master=self.root, value="*.*")
        self.folder_path = tk.StringVar(master=self.root)
        ttk.Label(tab, text="Filter").grid(row=1, column=0, sticky="w", pady=(8, 2))
        ttk.Entry(tab, textvariable=self.folder_filter, width=12).grid(
            row=1, column=1, sticky="w", pady=(8, 2)
        )
        ttk.Label(tab, text="Path").grid(row=2, column=0, sticky="w")
        ttk.Entry(tab, textvariable=self.folder_path).grid(row=2, column=1, sticky="ew")
        ttk.Button(tab, text="Browse...", command=self._browse).grid(row=2, column=2, padx=4)
        self.add_button = ttk.Button(tab, text="Add", command=self.add_folder)
        self.add_button.grid(row=3, column=0, sticky="w", pady=(6, 0))
        self.remove_button = ttk.Button(tab, text="Remove", command=self.remove_folder)
        self.remove_button.grid(row=3, column=1, sticky="w", pady=(6, 0))
        self.folder_error = ttk.Label(tab, text="", foreground="#c62828", wraplength=560)
        self.folder_error.grid(row=4, column=0, columnspan=4, sticky="w")

    def _build_buttons(self) -> None:
        bar = ttk.Frame(self.root, padding=(8, 0, 8, 8))
        bar.pack(fill="x")
        self.message = ttk.Label(bar, text="", wraplength=440, foreground="#c62828")
        self.message.pack(side="left", fill="x", expand=True)
        ttk.Button(bar, text="Close", command=self.root.destroy).pack(side="right")
        self.reload_button = ttk.Button(bar, text="Reload", command=self.reload)
        self.reload_button.pack(side="right", padx=4)
        self.save_button = ttk.Button(bar, text="Save", command=self.save)
        self.save_button.pack(side="right")

    # ------------------------------------------------------------------ values

    def load(self, values: FormValues) -> None:
        for name, var in self.text_vars.items():
            var.set(values.text.get(name, ""))
        self.text_vars["email_password"].set("")
        for name, flag in values.flags.items():
            self.flag_vars[name].set(flag)
        self.flag_vars["primary_only"].set(values.primary_only)
        self.flag_vars["backup_only"].set(values.backup_only)
        self.folder_tree.delete(*self.folder_tree.get_children())
        for pattern, path in values.folders:
            self.folder_tree.insert("", "end", values=(pattern, path))
        self.show_problems({})

    def collect(self) -> FormValues:
        values = FormValues()
        for name, var in self.text_vars.items():
            if name != "email_password":
                values.text[name] = var.get()
        values.email_password = self.text_vars["email_password"].get()
        for name, flag in self.flag_vars.items():
            if name not in ("primary_only", "backup_only"):
                values.flags[name] = bool(flag.get())
        values.primary_only = bool(self.flag_vars["primary_only"].get())
        values.backup_only = bool(self.flag_vars["backup_only"].get())
        for item in self.folder_tree.get_children():
            row: Any = self.folder_tree.item(item, "values")
            values.folders.append((str(row[0]), str(row[1])))
        return values

    def show_problems(self, problems: dict[str, str]) -> None:
        for name, label in self.error_labels.items():
            label.configure(text=problems.get(name, ""))
        folders = [(k, v) for k, v in problems.items() if k.startswith("folder")]
        self.folder_error.configure(
            text="\n".join(f"row {int(k[6:]) + 1}: {v}" for k, v in sorted(folders))
        )
        general = problems.get(GENERAL, "")
        if folders and not general:
            general = "a folder row is not valid (Folders tab)"
        self.message.configure(text=general, foreground="#c62828")

    # ------------------------------------------------------------------ actions

    def save(self) -> bool:
        """Save the fields if they are all valid; True when the file was written."""
        if self.service_state != "stopped":
            self.message.configure(text="stop the service before changing its configuration")
            return False
        try:
            problems = self.form.save(self.collect())
        except (OSError, SbsError) as exc:
            self.message.configure(text=f"not saved: {exc}", foreground="#c62828")
            return False
        if problems:
            self.show_problems(problems)
            if GENERAL not in problems:
                self.message.configure(text="not saved: correct the marked fields")
            return False
        self.load(self.form.values())
        self.message.configure(text=f"saved {self.config_file.name}", foreground="#2e7d32")
        return True

    def reload(self) -> None:
        self.load(self.form.reload())
        self.message.configure(text="")

    def add_folder(self) -> None:
        path = self.folder_path.get().strip()
        if not path:
            self.folder_error.configure(text="enter the folder's path first")
            return
        pattern = self.folder_filter.get().strip() or "*"
        self.folder_tree.insert("", "end", values=(pattern, path))
        self.folder_path.set("")
        self.folder_error.configure(text="")

    def remove_folder(self) -> None:
        for item in self.folder_tree.selection():
            self.folder_tree.delete(item)

    def _browse(self) -> None:
        chosen = filedialog.askdirectory(parent=self.root)
        if chosen:
            self.folder_path.set(chosen)

    def toggle_service(self) -> None:
        try:
            if self.service_state == "stopped":
                self.backend.start()
            elif self.service_state == "running":
                self.backend.stop()
        except (OSError, SbsError) as exc:
            self.message.configure(text=str(exc), foreground="#c62828")
        self.refresh()

    def test_email(self) -> None:
        """Send a test mail with the Email tab's values, in the background."""
        values = self.collect()
        values.flags["email_enabled"] = True  # a test needs what sending needs
        config, problems, _ = self.form.check(values)
        email_problems = {k: v for k, v in problems.items() if k.startswith("email")}
        if config is None:
            self.show_problems(email_problems or problems)
            self.test_result.configure(text="not sent: correct the marked fields", foreground="")
            return
        self.test_button.state(["disabled"])
        self.test_result.configure(text="sending...", foreground="")
        # The thread gets the queue, never the dialog: a Tk object must not
        # be released (and so destroyed) by any thread but Tk's own.
        threading.Thread(target=_send_test, args=(config, self._results), daemon=True).start()

    def _drain_results(self) -> None:
        try:
            while True:
                kind, text = self._results.get_nowait()
                self.test_result.configure(
                    text=text, foreground="#2e7d32" if kind == "ok" else "#c62828"
                )
                self.test_button.state(["!disabled"])
        except queue.Empty:
            pass
        if self.root.winfo_exists():
            self.root.after(100, self._drain_results)

    # ------------------------------------------------------------------ status

    def _poll(self) -> None:
        self.refresh()
        self.root.after(self._poll_ms, self._poll)

    def refresh(self) -> None:
        """Read the service's state and the node's status; colour, lock and label to match."""
        try:
            self.service_state = self.backend.state()
        except (OSError, SbsError) as exc:
            self.service_state = "stopped"
            self.message.configure(text=str(exc))
        detail = ""
        role = "stopped"
        try:
            status = self._status_source(self.config_file)
            role = str(status.get("role", "stopped"))
            if status.get("handing_over"):
                role = "handing over"
            detail = _format_status(status)
        except (OSError, SbsError) as exc:
            detail = f"no status: {exc}"
        if role == "stopped" and self.service_state in ("starting", "running"):
            role = "starting"  # the node is not answering yet
        elif role == "stopped" and self.service_state == "stopping":
            role = "stopping"
        self.role = role
        self.colour = ROLE_COLOURS.get(role, ROLE_COLOURS["busy"])
        self.role_label.configure(text=role.upper())
        self.state_label.configure(text=f"{self.backend.name}: {self.service_state}")
        self.detail.configure(state="normal")
        self.detail.delete("1.0", "end")
        self.detail.insert("1.0", detail)
        self.detail.configure(state="disabled")
        self._paint_icon()
        self._lock(self.service_state != "stopped")
        self.start_stop.configure(text="Start" if self.service_state == "stopped" else "Stop")
        if self.service_state in ("starting", "stopping", "not installed"):
            self.start_stop.state(["disabled"])
        else:
            self.start_stop.state(["!disabled"])

    def _paint_icon(self) -> None:
        self.icon_canvas.itemconfigure(self.icon_dot, fill=self.colour)
        size = _ICON_SIZE
        centre, radius = (size - 1) / 2, size / 2 - 1
        rows = []
        for y in range(size):
            row = []
            for x in range(size):
                inside = (x - centre) ** 2 + (y - centre) ** 2 <= radius**2
                row.append(self.colour if inside else "#ffffff")
            rows.append("{" + " ".join(row) + "}")
        self.icon_image.put(" ".join(rows))
        self.root.iconphoto(True, self.icon_image)

    def _lock(self, locked: bool) -> None:
        notebook: Any = self.notebook  # typeshed leaves Notebook's methods untyped
        for index in _LOCKED_TABS:
            notebook.tab(index, state="disabled" if locked else "normal")
        if locked and notebook.index("current") in _LOCKED_TABS:
            notebook.select(0)
        self.save_button.state(["disabled"] if locked else ["!disabled"])
        self.reload_button.state(["disabled"] if locked else ["!disabled"])

    def locked_tabs(self) -> list[int]:
        """Indexes of the tabs that cannot be used now."""
        notebook: Any = self.notebook  # typeshed leaves Notebook's methods untyped
        count = int(notebook.index("end"))
        return [i for i in range(count) if notebook.tab(i, "state") != "normal"]


def _default_backend(
    config_file: Path | None, service_name: str | None
) -> tuple[Path, ServiceBackend]:
    if sys.platform == "win32":
        from sbs_winsvc.cfg.backend import WindowsServiceBackend  # noqa: PLC0415

        service = WindowsServiceBackend(service_name)
        stored = service.config_file()
        chosen = config_file or stored
        if chosen is None:
            raise SbsError(
                f"{service.name} is not installed with a configuration: give --config FILE"
            )
        return chosen, service
    if config_file is None:
        raise SbsError("give the node's configuration file: -cfg --config FILE")
    return config_file, ProcessBackend(config_file)


def run_dialog(*, config_file: Path | None, service_name: str | None = None) -> int:
    """Show the dialog until it is closed; the exit code."""
    path, backend = _default_backend(config_file, service_name)
    try:
        ConfigForm(path)
    except FileNotFoundError:
        raise SbsError(f"{path}: there is no such configuration file") from None
    except (OSError, ValueError) as exc:
        raise SbsError(f"{path} cannot be edited: {exc}") from None
    root = tk.Tk()
    ConfigDialog(root, path, backend)
    root.mainloop()
    return 0


def _send_test(config: Any, results: queue.Queue[tuple[str, str]]) -> None:
    """Send the test mail (in a worker thread) and put the outcome on ``results``."""
    import anyio  # noqa: PLC0415

    from sbs_core.alerts import (  # noqa: PLC0415 - only for the test
        MailError,
        compose_mail,
        email_test_event,
        send_mail,
    )

    mail = compose_mail(email_test_event(config))
    try:
        anyio.run(send_mail, config.email, mail.subject, mail.body)
    except MailError as exc:
        results.put(("error", f"not sent: {exc}"))
    except Exception as exc:
        results.put(("error", f"not sent: {type(exc).__name__}: {exc}"))
    else:
        email = config.email
        results.put(("ok", f"sent to {', '.join(email.recipients)} via {email.host}:{email.port}"))
