"""The fixed artifact paths that the CLI defaults to and ``dvc.yaml`` declares (relative to the project)."""

DATA = "data/prepared"
TEACHER = "models/teacher"
TEACHER_CKPT = "checkpoints/teacher"
SCORES = "scores"
PRUNED = "models/pruned"
STUDENT = PRUNED
FINETUNED = "models/finetuned"
FINETUNE_CKPT = "checkpoints/finetune"
SAMPLES = "samples"
METRICS = "metrics"
