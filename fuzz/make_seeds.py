"""Makes the small hand-written seeds in fuzz/seeds/ (run once with PyTorch; the fuzzers and
tests never need Python). The fixture files themselves are added by fuzz/corpus.sh."""
import argparse, collections, io, os, pickle, zipfile

import torch
from safetensors.torch import save_file

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
sd = collections.OrderedDict(
    [
        ("cls_token", torch.zeros(1, 1, 4)),
        ("blocks.0.attn.qkv.weight", torch.randn(12, 4)),
        ("view_t", base.t()),
        ("view_slice", base[1:, 2:5]),
        ("half", torch.ones(3, dtype=torch.float16)),
        ("bf", torch.ones(2, dtype=torch.bfloat16)),
        ("idx", torch.arange(5)),
        ("flag", torch.tensor([True, False])),
        ("scalar", torch.tensor(3.5)),
        ("empty", torch.zeros(0, 3)),
    ]
)
ns = argparse.Namespace(lr=1e-3, name="mae", sizes=[1, 2, 3])
ckpt = {"model": sd, "epoch": 3, "args": ns, "meta": {"note": b"bytes", "t": (1, 2.5, None, True)}}
torch.save(ckpt, os.path.join(out, "nested.pth"))
torch.save(ckpt, os.path.join(out, "nested_legacy.pth"), _use_new_zipfile_serialization=False)
torch.save(sd, os.path.join(out, "flat_legacy.pth"), _use_new_zipfile_serialization=False)
save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(out, "small.safetensors"), metadata={"format": "pt"})
for name in ["nested.pth"]:
    with zipfile.ZipFile(os.path.join(out, name)) as z:
        pkl = [n for n in z.namelist() if n.endswith("data.pkl")][0]
        open(os.path.join(out, name.replace(".pth", ".pkl")), "wb").write(z.read(pkl))
# Plain pickles of every protocol (no torch objects).
plain = {"a": [1, 2, (3, 4)], "b": {"c": 1.5, "d": "x" * 300, "e": b"\x00\x01"}, "f": 2**70, "g": -5}
for p in range(0, 6):
    open(os.path.join(out, f"plain_p{p}.pkl"), "wb").write(pickle.dumps(plain, protocol=p))
