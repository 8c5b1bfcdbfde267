"""The Celery app's broker connection (bonedetect/queue.py)."""

from __future__ import annotations

from kombu.transport import sqlalchemy as kombu_sqlalchemy

from bonedetect.queue import EMBEDDED_POLL_S, make_celery
from bonedetect.settings import Settings


def test_the_embedded_broker_carries_a_message_and_polls_often(tmp_path):
    """An idle worker of the embedded broker looks for work every EMBEDDED_POLL_S, not kombu's 1 s (a new job's
    first chunk waited up to that long), and the setting does not reach create_engine, which would refuse it."""
    settings = Settings.from_env({"BONEDETECT_HOME": str(tmp_path)})
    assert settings.embedded
    app = make_celery(settings)
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("poll-test")
        queue.put({"image_ids": ["a", "b"]})
        message = queue.get(timeout=5)
        message.ack()
        assert message.payload == {"image_ids": ["a", "b"]}
        assert isinstance(conn.transport, kombu_sqlalchemy.Transport)
        assert conn.transport.polling_interval == EMBEDDED_POLL_S < 1.0
        queue.close()


def test_redis_options_stay_off_the_embedded_broker(tmp_path):
    """kombu's SQLAlchemy transport hands its options to create_engine: only Redis gets visibility_timeout."""
    embedded = make_celery(Settings.from_env({"BONEDETECT_HOME": str(tmp_path)}))
    assert embedded.conf.broker_transport_options == {}
    redis = make_celery(Settings.from_env({"BONEDETECT_HOME": str(tmp_path), "BROKER_URL": "redis://127.0.0.1:6379/0",
                                           "VISIBILITY_TIMEOUT_S": "9000"}))
    assert redis.conf.broker_transport_options == {"visibility_timeout": 9000}
