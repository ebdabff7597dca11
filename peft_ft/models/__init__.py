"""The base model: where it is (hub, local folder, embedded MiniLM), loading it, checking its files, trusting its code."""
