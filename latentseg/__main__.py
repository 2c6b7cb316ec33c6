import sys

from latentseg.cli import main

sys.exit(main())
