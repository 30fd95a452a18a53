//! Forward-pass check: candle MMSeg backbones (and original-layout models) vs references.
