"""Everything between user input and (token ids, patches), and back: see README "Python API"."""

from fuyu.preprocess.batch import FuyuBatch, Sample
from fuyu.preprocess.boxes import Box
from fuyu.preprocess.errors import ImageError, ImageWarning, PreprocessError, PromptError
from fuyu.preprocess.pages import INPUT_EXTENSIONS, Page, list_pages, load_page, parse_pages
from fuyu.preprocess.processor import FuyuProcessor
from fuyu.preprocess.prompt import TASK_PROMPTS, ask_prompt, box_to_text_prompt, task_prompt, text_to_box_prompt
from fuyu.preprocess.tokenizer import Tokenizer

__all__ = ["FuyuProcessor", "FuyuBatch", "Sample", "Box", "Tokenizer", "PreprocessError", "ImageError",
           "PromptError", "ImageWarning", "Page", "list_pages", "load_page", "parse_pages",
           "INPUT_EXTENSIONS", "TASK_PROMPTS", "ask_prompt", "box_to_text_prompt", "task_prompt",
           "text_to_box_prompt"]
