"""One reader per file format: CoNLL/BIO, SQuAD JSON, the GLUE presets, Label Studio exports."""
