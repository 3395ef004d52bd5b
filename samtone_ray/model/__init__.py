"""The dual encoder: towers over a Hugging Face encoder, its on-disk layout, tokenisation and the SamToNe loss."""
