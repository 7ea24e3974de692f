"""python -m tbd_ops: prints how tbd_ops was built and what it runs on (for bug reports)."""
import sys

from tbd_ops._env import main

if __name__ == "__main__":
    sys.exit(main())
