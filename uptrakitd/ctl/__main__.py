"""python -m uptrakitd.ctl: uptrakitctl without its console script."""
from .commands import run

run()
