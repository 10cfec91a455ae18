"""One module per CLI command group; importing a module registers its commands on the app."""
