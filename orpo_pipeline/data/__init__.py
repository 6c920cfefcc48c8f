"""Preference data: file formats, readers, cleaning, the drop folder and Hugging Face imports."""
