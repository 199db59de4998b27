-- Settle one request, atomically: its reservation becomes its true usage
-- (kept until the pipeline's totals include it), its concurrency slots are
-- freed, and token rates get back what the worst case over-charged.
--
-- KEYS[1] pending  KEYS[2] pending expiry  KEYS[3] reserved
-- KEYS[4 .. 3+NC] concurrency sets   KEYS[4+NC ..] token rate state
-- ARGV 1 event id  2 true tokens  3 true micro-USD (rounded up)
--      4 settled entry expiry (absolute ms)  6 now_ms
--      5 reserving: 0 no, 1 yes, 2 yes but only an entry still pending (a
--        reported usage: a gone entry expired, or the pipeline released it)
--      7 NC  8 NR, then per rule: algorithm, limit, window ms, tokens to give back
--        (negative: charge more, the request used more than it reserved)
--      algorithm 0 GCRA, 1 sliding window, 2 a plain token counter (an end
--        user's tokens of the day: corrected only while it still exists)

local id = ARGV[1]
local tokens, micro = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = tonumber(ARGV[6])
local nc, nr = tonumber(ARGV[7]), tonumber(ARGV[8])

local entry = nil
if ARGV[5] ~= '0' then
  entry = redis.call('HGET', KEYS[1], id)
end
if ARGV[5] == '1' or (ARGV[5] == '2' and entry) then
  local old_tokens, old_micro = 0, 0
  if entry then
    local t, m = string.match(entry, '^(%-?%d+):(%-?%d+)$')
    old_tokens, old_micro = tonumber(t), tonumber(m)
  end
  -- No entry (mode 1): it expired meanwhile; the true usage still counts
  -- until the pipeline's totals include it. Mode 2 never gets here without
  -- one: re-adding it after the pipeline released it would count it twice.
  if tokens == 0 and micro == 0 then
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  else
    redis.call('HSET', KEYS[1], id, tokens .. ':' .. micro)
    redis.call('ZADD', KEYS[2], tonumber(ARGV[4]), id)
  end
  redis.call('HINCRBY', KEYS[3], 'tokens', tokens - old_tokens)
  redis.call('HINCRBY', KEYS[3], 'micro_usd', micro - old_micro)
end

for i = 1, nc do
  redis.call('ZREM', KEYS[3 + i], id)
end

for i = 1, nr do
  local base = 8 + (i - 1) * 4
  local algorithm, limit, window = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local give_back = tonumber(ARGV[base + 4])
  local key = KEYS[3 + nc + i]
  if algorithm == 2 then
    if redis.call('EXISTS', key) == 1 then
      redis.call('INCRBY', key, -give_back)
    end
  elseif algorithm == 0 then
    local tat = tonumber(redis.call('GET', key))
    if tat then
      local new_tat = tat - give_back * window / limit
      if new_tat <= now then
        redis.call('DEL', key)
      else
        redis.call('SET', key, string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now))
      end
    end
  else
    local start = math.floor(now / window) * window
    if tonumber(redis.call('HGET', key, 's')) == start then
      local c = tonumber(redis.call('HGET', key, 'c')) or 0
      redis.call('HSET', key, 'c', math.max(c - give_back, 0))
    end
  end
end
return 1
