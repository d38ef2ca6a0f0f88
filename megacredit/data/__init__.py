"""Datasets (offline loaders of LiveCodeBench v6, SciKnowEval L3, ToolAlpaca), the prompt
templates of CREDIT appendix A.1, and the self-teacher / contrastive token sequences."""

from megacredit.data.common import DatasetRowError, LoadedDataset
from megacredit.data.loaders import BENCHMARK_ENV, load_benchmark
from megacredit.data.teacher_context import SampleSequences, TeacherContextConfig, build_teacher_contexts
from megacredit.data.templates import encode_prompt_segments, encode_student_prompt, student_messages

__all__ = [
    "BENCHMARK_ENV",
    "DatasetRowError",
    "LoadedDataset",
    "SampleSequences",
    "TeacherContextConfig",
    "build_teacher_contexts",
    "encode_prompt_segments",
    "encode_student_prompt",
    "load_benchmark",
    "student_messages",
]
