"""Stage functions keep the outputs dvc.yaml declares, whatever the source of the teacher."""

from diffprune import stages
from diffprune.config import DataParams, TeacherParams


def test_builtin_teacher_creates_the_declared_checkpoint_folder(tmp_path):
    stages.prepare(DataParams(max_images=40), tmp_path / "data")
    info = stages.teacher(TeacherParams(), tmp_path / "data", tmp_path / "teacher", tmp_path / "ck", tmp_path / "m")
    assert info["pretrained"] == "builtin:teacher-digits16"
    assert (tmp_path / "ck").is_dir(), "dvc.yaml declares checkpoints/teacher as an output"
    assert (tmp_path / "teacher" / "unet" / "architecture.json").is_file()
