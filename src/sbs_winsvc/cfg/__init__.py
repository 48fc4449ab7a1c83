"""The ``-cfg`` configuration dialog: the TOML form (:mod:`.form`), the service it drives
(:mod:`.backend`) and the Tk window (:mod:`.dialog`)."""
