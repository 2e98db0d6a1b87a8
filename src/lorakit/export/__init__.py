"""Deploying what was trained: the merged model or the adapter alone as GGUF (llama.cpp / Ollama), and adapters
checked and converted for vLLM and SGLang. `lorakit export` is the command; see command.py."""
