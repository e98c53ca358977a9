"""`python -m modelpress`: the command line, where no `modelpress` script is installed (a source tree on
PYTHONPATH, as on a GPU machine that gets its dependencies as carried wheels)."""

from modelpress.cli.main import app

app(prog_name="modelpress")
