async def test_private_redis_answers(redis) -> None:
    assert await redis.ping() is True
    info = await redis.info("server")
    assert info["tcp_port"] == 0  # unix socket only: never a shared Redis
