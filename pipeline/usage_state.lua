-- Write one customer's period totals and release the reservations they now
-- include, atomically (one script, keys of one customer: one cluster slot).
--
-- KEYS[1] usage {p}:usage:{c}:{period}        KEYS[2] pending {p}:pending:{c}:{period}
-- KEYS[3] pending expiry {p}:pending_exp:…     KEYS[4] reserved {p}:reserved:{c}:{period}
-- ARGV 1 version (the totals' event count)  2 force (1/0)  3 N = 2 × fields,
--      then N field/value strings, then the ids of the events the totals include.
--
-- Totals only grow with the events they include, so the event count orders
-- them: an older state (a worker that lost its partition, a replay catching
-- up) never overwrites a newer one. Totals are absolute: writing the same
-- state twice leaves the same hash.

local version = tonumber(ARGV[1])
local n = tonumber(ARGV[3])
local stored = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
local wrote = 0
if ARGV[2] == '1' or version >= stored then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4, 3 + n))
  wrote = 1
end
-- Either way these ids are inside the stored totals now (a newer state
-- includes every event of an older one): their reservations are done.
for i = 4 + n, #ARGV do
  local id = ARGV[i]
  local entry = redis.call('HGET', KEYS[2], id)
  if entry then
    local t, m = string.match(entry, '^(%-?%d+):(%-?%d+)$')
    if t then
      redis.call('HINCRBY', KEYS[4], 'tokens', -tonumber(t))
      redis.call('HINCRBY', KEYS[4], 'micro_usd', -tonumber(m))
    end
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[3], id)
end
return wrote
