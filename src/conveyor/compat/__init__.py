"""Drop-in modules for the libraries conveyor replaces: change the import, keep the code.

Each module keeps its library's documented names, arguments, return values and printed output,
and runs on conveyor's public API; where the original could hang or lose work, the module keeps
the documented contract on the safe engine instead. ``docs/migration/`` shows each move.
"""
