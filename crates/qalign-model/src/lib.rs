//! mPLUG-Owl2 / OneAlign in candle: loads the official checkpoints unchanged and scores images.
