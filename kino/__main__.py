from kino.cli import run

run()
