from jaxmerge.cli import run

run()
