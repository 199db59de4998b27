-- Admission of one request: every check and the reservation, atomically, in
-- one Redis round trip. Nothing is written unless every check passes, so a
-- refusal never pushes the customer's next admission further out.
--
-- KEYS[1]  the customer's keys' revoked flags {p}:revoked:{c} (key id -> 1/0)
-- KEYS[2]  usage totals      {p}:usage:{c}:{period}   (the pipeline's, absolute)
-- KEYS[3]  pending           {p}:pending:{c}:{period} event id -> "tokens:micro_usd"
-- KEYS[4]  pending expiry    {p}:pending_exp:{c}:{period}
-- KEYS[5]  reserved sums     {p}:reserved:{c}:{period}
-- KEYS[6 .. 5+NC]            concurrency sets (zset: event id -> expiry ms)
-- KEYS[6+NC .. 5+NC+NR]      rate state (GCRA: TAT ms; sliding window: hash s,c,p);
--                            the last NU of them the end user's
-- KEYS[6+NC+NR]              the end user's tokens of the day (only with a day quota)
--
-- ARGV  1 now_ms  2 event id  3 reservation expiry (absolute ms)  4 period end ms
--       5 period token quota (-1: none)  6 budget micro-USD (-1: none)
--       7 input tokens  8 output tokens (worst case)  9 input micro-USD (rounded up)
--       10 output micro-USD per token  11 cuttable (1: output may shrink to fit)
--       12 min output tokens when cut
--       13 fallback: budget micro-USD (-1: no fallback)  14 its input micro-USD
--       15 its output micro-USD per token
--       16 NC, then per set: limit
--       then NR, then per rule: algorithm (0 GCRA, 1 sliding), limit, window ms,
--            counts (0 requests, 1 input, 2 output, 3 total tokens)
--       then NU (how many of the rules are the end user's: the last ones),
--            the end user's day token quota (-1: none), the day's end ms,
--       and last the API key's id
--
-- Returns {status, reason, retry_after_ms, served, output_tokens, rule,
--          tokens_used, micro_used, in_flight..., (remaining, reset_ms) per rule,
--          the end user's tokens of the day (this one too, if admitted)}
--   status 1 admitted, 0 refused, -1 key revoked, -2 the key has no flag here
--          yet (created before the flags were kept per customer: see admission.py)
--   reason 0 none, 1 requests/min, 2 tokens/min, 3 concurrency, 4 period tokens,
--          5 budget, 6 a request larger than a rate limit could ever admit,
--          7 the end user's day tokens, 8 its requests/min, 9 its tokens/min
--          (also for a request larger than its tokens/min could ever admit)
--   served 0 the requested model, 1 the fallback model
--   rule   the index (1-based) of the refusing rate rule or concurrency set

local revoked = redis.call('HGET', KEYS[1], ARGV[#ARGV])
if revoked ~= '0' then
  return {revoked and -1 or -2, 0, 0, 0, 0, 0, 0, 0, 0}
end

local now = tonumber(ARGV[1])
local id = ARGV[2]
local expiry = tonumber(ARGV[3])
local period_end = tonumber(ARGV[4])
local quota = tonumber(ARGV[5])
local budget = tonumber(ARGV[6])
local in_tokens = tonumber(ARGV[7])
local out_tokens = tonumber(ARGV[8])
local in_micro = tonumber(ARGV[9])
local out_rate = tonumber(ARGV[10])
local cuttable = ARGV[11] == '1'
local min_out = tonumber(ARGV[12])
local fb_budget = tonumber(ARGV[13])
local fb_in_micro = tonumber(ARGV[14])
local fb_out_rate = tonumber(ARGV[15])
local nc = tonumber(ARGV[16])
local nr = tonumber(ARGV[17 + nc])
local nu = tonumber(ARGV[18 + nc + nr * 4])
local user_quota = tonumber(ARGV[19 + nc + nr * 4])
local day_end = tonumber(ARGV[20 + nc + nr * 4])
local reserving = quota >= 0 or budget >= 0

local status, reason, retry, served, rule = 1, 0, 0, 0, 0
local function refuse(why, wait, which)
  -- The reported reason is the limit that holds the request back longest
  -- (-1: never, a request larger than a limit).
  if status == 1 or (retry >= 0 and (wait < 0 or wait > retry)) then
    reason, retry, rule = why, wait, which or 0
  end
  status = 0
end

-- 1. Period quota and budget: the pipeline's totals + outstanding reservations.
local used_tokens, used_micro = 0, 0
if reserving then
  -- Requests that never finished stop holding their reservation.
  local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 64)
  for _, old in ipairs(expired) do
    local entry = redis.call('HGET', KEYS[3], old)
    if entry then
      local t, m = string.match(entry, '^(%-?%d+):(%-?%d+)$')
      redis.call('HINCRBY', KEYS[5], 'tokens', -tonumber(t))
      redis.call('HINCRBY', KEYS[5], 'micro_usd', -tonumber(m))
      redis.call('HDEL', KEYS[3], old)
    end
    redis.call('ZREM', KEYS[4], old)
  end
  local totals = redis.call('HMGET', KEYS[2], 'input_tokens', 'output_tokens', 'cost_micro_usd')
  local held = redis.call('HMGET', KEYS[5], 'tokens', 'micro_usd')
  used_tokens = (tonumber(totals[1]) or 0) + (tonumber(totals[2]) or 0) + math.max(tonumber(held[1]) or 0, 0)
  used_micro = (tonumber(totals[3]) or 0) + math.max(tonumber(held[2]) or 0, 0)
end

-- The output tokens that fit under the quota and a budget, or -1 and why not.
local function fit(limit_micro, first_micro, rate)
  local out = out_tokens
  if quota >= 0 then
    local left = quota - used_tokens - in_tokens
    if left < out then
      if cuttable and left >= min_out then out = left else return -1, 4 end
    end
  end
  if limit_micro >= 0 then
    local left = limit_micro - used_micro - first_micro
    if left < math.ceil(out * rate) then
      if cuttable and rate > 0 and math.floor(left / rate) >= min_out then
        out = math.floor(left / rate)
      else
        return -1, 5
      end
    end
  end
  return out, 0
end

local reserve_micro = 0
if reserving then
  local out, why = fit(budget, in_micro, out_rate)
  if out < 0 and why == 5 and fb_budget >= 0 then
    out, why = fit(fb_budget, fb_in_micro, fb_out_rate)
    if out >= 0 then
      served, in_micro, out_rate = 1, fb_in_micro, fb_out_rate
    end
  end
  if out < 0 then
    refuse(why, period_end - now)
  else
    out_tokens = out
    reserve_micro = in_micro + math.ceil(out * out_rate)
  end
end

-- 2. Concurrency: requests in flight, each until it ends or expires.
local in_flight = {}
for i = 1, nc do
  local key = KEYS[5 + i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local count = redis.call('ZCARD', key)
  in_flight[i] = count
  if count >= tonumber(ARGV[16 + i]) then
    -- Freed when the oldest running request ends: at most its expiry away.
    refuse(3, 1000, i)
  end
end

-- 3. Rates. Checked first, written only once everything passed.
local rate_out = {}
local writes = {}
local costs = {in_tokens + out_tokens, in_tokens, out_tokens, in_tokens + out_tokens}
for i = 1, nr do
  local base = 17 + nc + (i - 1) * 4
  local algorithm, limit, window = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local counts = tonumber(ARGV[base + 4])
  local cost = counts == 0 and 1 or costs[counts + 1]
  local key = KEYS[5 + nc + i]
  local why = counts == 0 and 1 or 2
  if i > nr - nu then why = why + 7 end  -- the end user's: 8 requests, 9 tokens
  local remaining, reset
  if algorithm == 0 then
    local interval = window / limit
    local tat = math.max(tonumber(redis.call('GET', key) or now), now)
    local new_tat = tat + cost * interval
    local allow_at = new_tat - window
    if cost > limit then
      refuse(i > nr - nu and 9 or 6, -1, i)
      remaining, reset = math.floor((now - (tat - window)) / interval + 1e-9), math.ceil(tat - now)
    elseif now < allow_at then
      refuse(why, math.ceil(allow_at - now), i)
      remaining, reset = math.floor((now - (tat - window)) / interval + 1e-9), math.ceil(tat - now)
    else
      remaining, reset = math.floor((now - allow_at) / interval + 1e-9), math.ceil(new_tat - now)
      writes[#writes + 1] = {0, key, string.format('%.3f', new_tat), math.max(math.ceil(new_tat - now), 1)}
    end
  else
    local start = math.floor(now / window) * window
    local state = redis.call('HMGET', key, 's', 'c', 'p')
    local s, c, p = tonumber(state[1]) or start, tonumber(state[2]) or 0, tonumber(state[3]) or 0
    if s ~= start then
      p = (s == start - window) and c or 0
      c = 0
    end
    local elapsed = now - start
    local estimate = p * (window - elapsed) / window + c
    if cost > limit then
      refuse(i > nr - nu and 9 or 6, -1, i)
    elseif estimate + cost > limit then
      local wait
      if c + cost > limit then
        wait = (start + window - now) + math.ceil(window * (1 - (limit - cost) / c))
      else
        wait = math.ceil(window * (1 - (limit - c - cost) / p)) - elapsed
      end
      refuse(why, math.max(wait, 1), i)
    else
      estimate = estimate + cost
      writes[#writes + 1] = {1, key, start, c + cost, p, window}
    end
    remaining, reset = math.max(math.floor(limit - estimate), 0), start + window - now
  end
  rate_out[#rate_out + 1] = remaining
  rate_out[#rate_out + 1] = reset
end

-- 4. The end user's tokens of the day: its own counter (reservations and
-- settled usage), checked with the output as the quota and budget left it.
local user_used = 0
if user_quota >= 0 then
  user_used = tonumber(redis.call('GET', KEYS[6 + nc + nr]) or '0')
  if user_used + in_tokens + out_tokens > user_quota then
    refuse(7, day_end - now)
  end
end

if status == 1 then
  if user_quota >= 0 then
    local key = KEYS[6 + nc + nr]
    user_used = redis.call('INCRBY', key, in_tokens + out_tokens)
    -- Kept past the day's end while a reservation of it may still settle.
    redis.call('PEXPIREAT', key, math.max(day_end, expiry))
  end
  for _, w in ipairs(writes) do
    if w[1] == 0 then
      redis.call('SET', w[2], w[3], 'PX', w[4])
    else
      redis.call('HSET', w[2], 's', w[3], 'c', w[4], 'p', w[5])
      redis.call('PEXPIRE', w[2], 2 * w[6])
    end
  end
  for i = 1, nc do
    redis.call('ZADD', KEYS[5 + i], expiry, id)
    redis.call('PEXPIRE', KEYS[5 + i], math.max(expiry - now, 1))
    in_flight[i] = in_flight[i] + 1
  end
  if reserving then
    redis.call('HSET', KEYS[3], id, (in_tokens + out_tokens) .. ':' .. reserve_micro)
    redis.call('ZADD', KEYS[4], expiry, id)
    redis.call('HINCRBY', KEYS[5], 'tokens', in_tokens + out_tokens)
    redis.call('HINCRBY', KEYS[5], 'micro_usd', reserve_micro)
    used_tokens = used_tokens + in_tokens + out_tokens
    used_micro = used_micro + reserve_micro
  end
end

local result = {status, reason, retry, served, out_tokens, rule, used_tokens, used_micro}
for i = 1, nc do result[#result + 1] = in_flight[i] end
for _, v in ipairs(rate_out) do result[#result + 1] = v end
result[#result + 1] = user_used
return result
