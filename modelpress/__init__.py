"""modelpress: the layer shared by the API and the worker (specs, settings, database, storage); no torch here."""
