"""One module per `fuyu` subcommand; each exposes `register(app)`."""
