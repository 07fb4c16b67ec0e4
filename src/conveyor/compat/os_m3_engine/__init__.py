"""os-m3-engine on conveyor: ``from conveyor.compat.os_m3_engine.launcher import create``.

A frontend produces items, an optional transport turns each into another, an optional backend
consumes them; every stage can have several threads. The engine is a conveyor pipeline, so it
runs on every supported Python, never repeats an item when the frontend has more threads, and
an exception in one stage method is logged with its item while the rest of the work goes on.
"""
