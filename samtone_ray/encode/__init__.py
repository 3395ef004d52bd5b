"""Re-encoding corpora on Ray Data, exactly once, and the document index built from the embeddings."""
