"""Reading data: the data folder, table files, splits and carving (files), batching rows (batching), and one reader per file format (formats/)."""
