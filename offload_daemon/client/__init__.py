"""What `toe`'s commands and `toe bench` share: the client side of an adapter.

errors      CLIError (one line, exit 1), Interrupted, `ranged` (argparse numbers)
env         environment checks (root, /dev/net/tun, programs, the built shim), child environments
inspection  the inspection-API client (api_request / api_call / api_pings)
adapter     an adapter's life cycle: its state files, up, down, the `toe run` environment

Nothing here imports offload_daemon.cli or bench; both import this.
"""
