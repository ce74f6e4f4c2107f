import sys

from llamaops_trainer.main import run

sys.exit(run())
