"""The `modelpress` command line: keys and migrations on the database, an HTTP client, the embedded runner.

Nothing here imports torch: the client runs on laptops that only talk to the service.
"""
