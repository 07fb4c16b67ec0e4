"""Durable task queues. This part holds, so far, the backend contract and its memory and SQLite
backends (``conveyor.tasks.backends``); the queue, the worker and the CLI are built on them."""
