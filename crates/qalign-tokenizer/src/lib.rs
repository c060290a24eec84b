//! A pure-Rust reader and encoder for the LLaMA SentencePiece `tokenizer.model`, plus the
//! official `tokenizer_image_token` splicing and the Q-Align prompt strings.
