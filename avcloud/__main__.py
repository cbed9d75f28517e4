import sys

from avcloud.cli import main

sys.exit(main())
