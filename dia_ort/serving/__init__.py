"""`dia-ort serve`: an OpenAI-compatible speech server on the continuous-batching scheduler.

One path from the model to the network, each layer a module the next one only calls: the scheduler
(dia_ort/scheduler.py) -> `SpeechService` (a request to audio bytes, service.py) -> the FastAPI app
of `create_app` (routes, schemas, errors, app.py). Needs the `serve` extra.
"""
