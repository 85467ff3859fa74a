"""Does the demo base's answer attention point at the asked patch? (teacher of the opt-in distillation, #11)

Prints, per LLM layer, how often the vision token with the most attention from the answer-predicting
positions is the relevant patch, and its share of that attention. Run from the project root:
    python benchmarks/teacher_check.py
"""

import torch

torch.set_num_threads(1)
from lightning_lvp import adapter
from lightning_lvp.data.datamodule import LlavaDataModule
from lightning_lvp.data.digits import DigitsConfig
from lightning_lvp.evaluate import model_inputs
from lightning_lvp.model import PrunedLlava
from lightning_lvp.state import causal_mask

llava = adapter.load_llava("assets/demo_base")
m = PrunedLlava(llava, None).eval()
dm = LlavaDataModule(
    "assets/demo_base",
    dataset="digits",
    batch_size=32,
    val_batch_size=64,
    num_workers=0,
    cache_dir=".cache",
    digits=DigitsConfig(question_types=["cell"]),
)
dm.setup("fit")
batch = next(iter(dm.val_dataloader()))
with torch.no_grad():
    st, _ = m.initial_state(**model_inputs(batch))
    h = st.hidden
    mask = causal_mask(st.valid, h.shape[1])
    pe = adapter.rotary(llava, h, st.position_ids)
    labels = batch["labels"]
    nxt = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100  # (B,T) predicts a label
    B, T = labels.shape
    acc = torch.zeros(m.dims.num_layers, B, T)
    for i in range(m.dims.num_layers):
        for q in range(nxt.sum(1).max()):
            qi = torch.stack([nxt[b].nonzero()[min(q, nxt[b].sum() - 1), 0] for b in range(B)])
            acc[i] += adapter.attention_probs(llava, i, h, pe, qi, mask).sum(1)
        h = adapter.run_layer(llava, i, h, mask, st.position_ids, pe)
    vis = st.vision
    rel = batch["relevant_mask"] & vis
    for i in range(m.dims.num_layers):
        a = acc[i].masked_fill(~vis, -1)
        top = a.argmax(1)
        hit = rel[torch.arange(B), top].float().mean()
        mass = (acc[i] * rel).sum(1) / (acc[i] * vis).sum(1)
        print(
            f"layer {i + 1}: argmax-vision == relevant {hit:.2f}; relevant share of vision attention {mass.mean():.2f}"
        )
    a = acc.sum(0).masked_fill(~vis, -1)
    print("all layers:", rel[torch.arange(B), a.argmax(1)].float().mean().item())
