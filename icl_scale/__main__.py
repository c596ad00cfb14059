import sys

from icl_scale.cli import main

sys.exit(main())
