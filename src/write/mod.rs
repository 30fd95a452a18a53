//! Writing outputs: `.pth` files `torch.load(weights_only=True)` reads ([`pth`]: a zip of
//! stored entries, [`zip`], around the pickle torch.save would write, [`pickle`]) and the
//! layout of `.safetensors` files ([`safetensors`]); [`outfile`] does positioned writes and
//! kernel copies into the output.

pub mod outfile;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod zip;
