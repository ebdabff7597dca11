"""The run folder: its file names, creating and locking it, reading it back (load_run), portable copies and the model card."""
