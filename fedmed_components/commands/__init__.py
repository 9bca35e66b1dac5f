"""One module per `fedmed` command group; each exposes `register(subparsers)`."""
