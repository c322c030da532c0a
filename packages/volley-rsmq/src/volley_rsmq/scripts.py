"""RSMQ's operations as Lua scripts that work on many messages per call, on PyRSMQ's own data layout.

PyRSMQ needs two round trips and one script per message received or sent.
These scripts do a whole batch in one round trip, on exactly the keys and
fields PyRSMQ (and the original Node.js rsmq) read and write, so a PyRSMQ or
py-volley producer or consumer on the other side of a queue sees no
difference:

- ``{ns}:{qname}`` is a sorted set of message ids scored by the millisecond at
  which each becomes visible;
- ``{ns}:{qname}:Q`` is a hash holding the queue attributes (``vt``,
  ``delay``, ``maxsize``, ``created``, ``modified``, ``totalsent``,
  ``totalrecv``) and, per message, its body (``{id}``), receive count
  (``{id}:rc``) and first-receive time (``{id}:fr``);
- ``{ns}:QUEUES`` is the set of queue names;
- a message id is the base-36 microsecond time of sending followed by 22
  random characters, so ids sort by sending time.

Volley adds one key of its own, ``{ns}:{qname}:volley:errors``, a hash of
message id to the last handler error recorded by a nack (``nack_with_reason``);
PyRSMQ never reads it, and Volley deletes a message's entry with the message.
Entries of messages that another client deleted (PyRSMQ's deleteMessage does
not know the hash) are swept by ``CHANGE_VISIBILITY``: every time it records
reasons it checks a random sample of the hash four times larger (at least 32)
and drops the entries whose message is gone, so such leftovers stay a small
fraction of the hash instead of growing with every nack.

Time always comes from the Redis server (``TIME``), as in RSMQ, so clocks of
producers and consumers never need to agree.
"""

from __future__ import annotations

# Everything every script starts with: allow writes after TIME on Redis < 5, and the server's clock in ms.
_PRELUDE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call("TIME")
local sec = tonumber(t[1])
local usec = tonumber(t[2])
local now = sec * 1000 + math.floor(usec / 1000)
"""

RECEIVE = (
    _PRELUDE
    + """
-- KEYS: queue zset, queue hash, errors hash. ARGV: max messages, vt in ms ("" = the queue's own vt).
local vt = ARGV[2]
if vt == "" then
  local qvt = redis.call("HGET", KEYS[2], "vt")
  if not qvt then return {-1} end
  vt = math.floor(tonumber(qvt) * 1000)
else
  vt = tonumber(vt)
end
if redis.call("HEXISTS", KEYS[2], "vt") == 0 then return {-1} end
local ids = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", now, "LIMIT", 0, tonumber(ARGV[1]))
local out = {now, vt, 0, 0}
local deadline = now + vt
local received = 0
for _, id in ipairs(ids) do
  local body = redis.call("HGET", KEYS[2], id)
  if body then
    redis.call("ZADD", KEYS[1], deadline, id)
    local rc = redis.call("HINCRBY", KEYS[2], id .. ":rc", 1)
    local fr
    if rc == 1 then
      redis.call("HSET", KEYS[2], id .. ":fr", now)
      fr = now
    else
      fr = tonumber(redis.call("HGET", KEYS[2], id .. ":fr")) or now
    end
    local err = false
    if rc > 1 then err = redis.call("HGET", KEYS[3], id) end
    out[#out + 1] = id
    out[#out + 1] = body
    out[#out + 1] = rc
    out[#out + 1] = fr
    out[#out + 1] = err
    received = received + 1
  else
    -- An id without a body cannot be delivered by anyone: drop it rather than return it forever.
    redis.call("ZREM", KEYS[1], id)
  end
end
if received > 0 then redis.call("HINCRBY", KEYS[2], "totalrecv", received) end
out[3] = redis.call("ZCARD", KEYS[1])
out[4] = redis.call("ZCOUNT", KEYS[1], "-inf", now)
return out
"""
)
"""Receive up to ARGV[1] visible messages and hide them for the visibility timeout, like RSMQ's receiveMessage.

Returns ``{now_ms, vt_ms, all_left, visible_left, id, body, rc, first_receive_ms, last_error_or_nil, ...}``,
or ``{-1}`` when the queue does not exist.
"""

CHANGE_VISIBILITY = (
    _PRELUDE
    + """
-- KEYS: queue zset, queue hash, errors hash. ARGV: vt in ms, reason ("" = none), then id, rc pairs.
local deadline = now + tonumber(ARGV[1])
local reason = ARGV[2]
local lost = {}
local recorded = 0
for i = 3, #ARGV, 2 do
  local id = ARGV[i]
  local rc = redis.call("HGET", KEYS[2], id .. ":rc")
  if rc == ARGV[i + 1] and redis.call("ZSCORE", KEYS[1], id) then
    redis.call("ZADD", KEYS[1], deadline, id)
    if reason ~= "" then
      redis.call("HSET", KEYS[3], id, reason)
      recorded = recorded + 1
    end
  else
    lost[#lost + 1] = id
    lost[#lost + 1] = ARGV[i + 1]
  end
end
if recorded > 0 then
  -- Reasons of messages deleted by other clients (PyRSMQ's deleteMessage does not know this hash) would stay
  -- forever: check a random sample, four times larger than what was just added, and drop those whose message
  -- is gone. HRANDFIELD needs Redis 6.2; older servers skip the sweep.
  local sample = redis.pcall("HRANDFIELD", KEYS[3], math.min(32 + 4 * recorded, 1000))
  if type(sample) == "table" and not sample.err then
    for _, field in ipairs(sample) do
      if redis.call("HEXISTS", KEYS[2], field) == 0 then redis.call("HDEL", KEYS[3], field) end
    end
  end
end
return lost
"""
)
"""Make messages visible again in ARGV[1] ms, like RSMQ's changeMessageVisibility, for many at once.

A message is only changed while it is still the delivery this consumer holds
(its receive count is unchanged): once its visibility timeout expired and
another consumer received it, changing it would cut into that consumer's time.
Returns the (id, rc) pairs that were not changed, flattened.
"""

SEND = (
    _PRELUDE
    + """
-- KEYS: queue zset, queue hash, queues set.
-- ARGV: qname, vt, delay, maxsize (used if the queue must be created), realtime channel ("" = none),
--       random id suffix, then delay-in-ms ("" = the queue's delay), body pairs.
if redis.call("HEXISTS", KEYS[2], "vt") == 0 then
  redis.call("HSETNX", KEYS[2], "vt", ARGV[2])
  redis.call("HSETNX", KEYS[2], "delay", ARGV[3])
  redis.call("HSETNX", KEYS[2], "maxsize", ARGV[4])
  redis.call("HSETNX", KEYS[2], "created", sec)
  redis.call("HSETNX", KEYS[2], "modified", sec)
  redis.call("SADD", KEYS[3], ARGV[1])
end
local digits = "0123456789abcdefghijklmnopqrstuvwxyz"
local function base36(n)
  local s = ""
  while n > 0 do
    local r = n % 36
    s = string.sub(digits, r + 1, r + 1) .. s
    n = math.floor(n / 36)
  end
  return s
end
local suffix = ARGV[6]
local stamp = sec * 1000000 + usec
local queue_delay = nil
local sent = 0
for i = 7, #ARGV, 2 do
  local delay = ARGV[i]
  if delay == "" then
    if queue_delay == nil then
      queue_delay = math.floor((tonumber(redis.call("HGET", KEYS[2], "delay")) or 0) * 1000)
    end
    delay = queue_delay
  else
    delay = tonumber(delay)
  end
  local id = base36(stamp + sent) .. suffix
  redis.call("ZADD", KEYS[1], now + delay, id)
  redis.call("HSET", KEYS[2], id, ARGV[i + 1])
  sent = sent + 1
end
redis.call("HINCRBY", KEYS[2], "totalsent", sent)
if ARGV[5] ~= "" then redis.call("PUBLISH", ARGV[5], redis.call("ZCARD", KEYS[1])) end
return sent
"""
)
"""Send many messages to one queue, creating the queue first if needed, like RSMQ's sendMessage.

Ids within one call take consecutive microsecond stamps with one shared random
suffix, so they are unique and keep the order in which they were given.
"""

DEPTH = (
    _PRELUDE
    + """
-- KEYS: queue zset. Returns {all messages, visible messages}.
return {redis.call("ZCARD", KEYS[1]), redis.call("ZCOUNT", KEYS[1], "-inf", now)}
"""
)
