"""A short tour of the five utilities on a tiny model (used by `make demo` until the CLI lands)."""

import torch

from advanced_training_utils import (
    DataAugmentation,
    GradientClipper,
    LearningRateScheduler,
    MixedPrecisionTrainer,
    TrainingStability,
)

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 * 32, 32), torch.nn.ReLU(),
                            torch.nn.Linear(32, 4))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
sched = LearningRateScheduler(opt, "cosine", T_max=5, warmup_steps=1)
clip = GradientClipper(max_norm=1.0)
mp = MixedPrecisionTrainer(enabled=True, device="cpu", dtype="bfloat16")
aug = DataAugmentation(seed=0)
x, y = torch.randn(64, 64, 32), torch.randint(0, 4, (64,))
for epoch in range(5):
    opt.zero_grad()
    with mp.autocast():
        loss = torch.nn.functional.cross_entropy(model(aug.augment_audio_features(x)), y)
    mp.scale_loss(loss).backward()
    mp.unscale_(opt)
    clip.clip(model)
    mp.step_optimizer(opt)
    sched.step()
    print(f"epoch {epoch}: loss={loss.item():.4f} lr={sched.get_lr():.2e}")
print("grad-norm stats:", clip.get_stats())
print("healthy weights:", TrainingStability.check_weights(model)["healthy"])
