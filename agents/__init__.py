"""What runs: source agents, normalize agents, the embedded broker and the command line."""
