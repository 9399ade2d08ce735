"""comfy-turbo's fleet: many ComfyUI workers behind Celery and RabbitMQ (optional; the pack never imports it).

Install the extra (``pip install 'comfy-turbo[scale]'``, i.e. Celery), run a RabbitMQ broker, start
``python -m scale.worker`` next to each ComfyUI and submit with ``python -m scale.client`` or
``scale.client.Fleet``. See docs/scale.md.
"""
