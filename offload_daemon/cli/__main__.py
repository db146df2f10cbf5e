import sys

from offload_daemon.cli.app import main

sys.exit(main())
