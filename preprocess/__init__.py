"""Everything between user input and (token ids, patches), and back: see README "Python API"."""

from preprocess.batch import FuyuBatch, Sample
from preprocess.boxes import Box
from preprocess.errors import ImageError, PreprocessError, PromptError
from preprocess.processor import FuyuProcessor
from preprocess.prompt import TASK_PROMPTS, ask_prompt, box_to_text_prompt, text_to_box_prompt
from preprocess.tokenizer import Tokenizer

__all__ = ["FuyuProcessor", "FuyuBatch", "Sample", "Box", "Tokenizer", "PreprocessError", "ImageError",
           "PromptError", "TASK_PROMPTS", "ask_prompt", "box_to_text_prompt", "text_to_box_prompt"]
