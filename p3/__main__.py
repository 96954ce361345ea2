from p3.cli import run

run()
