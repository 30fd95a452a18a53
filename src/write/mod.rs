//! Writing outputs: [`execute`] runs a plan (renamed tensors streamed from the input,
//! transforms computed one at a time) into a file [`atomic`] keeps nameless until commit; `.pth` files `torch.load(weights_only=True)` reads ([`pth`]: a zip of
//! stored entries, [`zip`], around the pickle torch.save would write, [`pickle`]) and the
//! layout of `.safetensors` files ([`safetensors`]); [`outfile`] does positioned writes and
//! kernel copies into the output.

pub mod atomic;
pub mod execute;
pub mod meta;
pub mod outfile;
pub mod pickle;
pub mod pth;
pub mod safetensors;
pub mod zip;
