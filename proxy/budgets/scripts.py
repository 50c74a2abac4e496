"""The Lua scripts of the Redis budget store.

`ADMIT` is the one round trip of a request's budget decision: it checks the site's pause and
every budget, then consumes all of them or none. Redis runs a script atomically, so replicas
never race between the check and the consumption.

Rules shared by all scripts:
- The clock is Redis `TIME` (one clock for every replica). The last argument may override it with
  a time in microseconds; only tests pass one, to drive the script through days and months.
- Times are integer microseconds since the epoch. They stay below 2**53, where Lua's doubles are
  exact, and numbers go back to Redis through `str` ("%.0f"), never Lua's lossy "%.14g".
- A key's expiry only reclaims memory; every decision compares stored values with `now` (period
  ids, lease scores, pause ends), so the scripts give the same answers under a test clock.
- Every key a script touches is passed in KEYS, and all keys of a site share the `{site}` hash
  tag: the scripts run unchanged on Redis Cluster.

`gcra.py` is the same arithmetic in Python; the tests hold the two against each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from dataclasses import field


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str = field(init=False)  # what EVALSHA names it by; computed once, asked per call

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()
        object.__setattr__(self, "sha", sha)


_PRELUDE = """
local DAY = 86400000000
local function clock(override)
  if override and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function int(v)
  if v then return tonumber(v) or 0 end
  return 0
end
local function str(x) return string.format('%.0f', x) end
-- Howard Hinnant's algorithms: days since 1970-01-01 <-> proleptic Gregorian (y, m, d).
local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end
-- The calendar day and month (UTC) of `now`: an id, and when the next one starts.
local function utc_day(now)
  local day = math.floor(now / DAY)
  return day, (day + 1) * DAY
end
local function utc_month(now)
  local y, m = civil_from_days(math.floor(now / DAY))
  local ny, nm = y, m + 1
  if nm == 13 then ny, nm = y + 1, 1 end
  return y * 12 + m - 1, days_from_civil(ny, nm, 1) * DAY
end
local function expire_after(key, us)
  redis.call('PEXPIRE', key, str(math.floor(us / 1000) + 1000))
end
-- A day's or a month's count: its hash holds 'p' (the period id), 'n' (requests), for a day 'b'
-- (response bytes), and the generation counting them: 'g' ('<period>:<token>', set when the
-- count starts, and again when Redis is found to have gone back in time) with 'f' and 'fb', how
-- much of n and b is a floor written back from an earlier generation (what a replica saw before
-- Redis lost it). What was counted since is n - f: a replica's view of an earlier generation
-- raises f, never what was counted since (another replica's outage counts, added on top).
-- A 'g' of another period (left by an older script at midnight) is none.
local function count_read(key, period)
  local h = redis.call('HMGET', key, 'p', 'n', 'b', 'g', 'f', 'fb')
  local c = {n = 0, b = 0, g = '', f = 0, fb = 0}
  if h[1] and tonumber(h[1]) == period then
    c.n, c.b = int(h[2]), int(h[3])
    local mark = str(period) .. ':'
    if h[4] and string.sub(h[4], 1, #mark) == mark then
      c.g, c.f, c.fb = h[4], int(h[5]), int(h[6])
    end
  end
  return c
end
local function count_write(key, c, period, token, ends, now, with_bytes)
  if c.g == '' then c.g, c.f, c.fb = str(period) .. ':' .. token, 0, 0 end
  if with_bytes then
    redis.call('HSET', key, 'p', str(period), 'n', str(c.n), 'b', str(c.b), 'g', c.g,
      'f', str(c.f), 'fb', str(c.fb))
  else
    redis.call('HSET', key, 'p', str(period), 'n', str(c.n), 'g', c.g, 'f', str(c.f))
  end
  expire_after(key, ends - now + 3600000000)
end
-- A replica's view of the same period (vn, vb, of generation vg): raise the count to it, where it
-- shows the count lost. Returns whether the count changed.
local function count_raise(c, vn, vb, vg, period, token)
  if vg == '' or vg == c.g then
    if vn <= c.n and vb <= c.b then return false end
    c.n, c.b = math.max(c.n, vn), math.max(c.b, vb)
    if vg ~= '' then
      -- Below what was seen of this very generation: Redis went back to an older snapshot. What
      -- was counted since is mixed into n; a new generation starts with all of it as its floor.
      c.g, c.f, c.fb = str(period) .. ':' .. token, c.n, c.b
    end
    return true
  end
  if c.g == '' then
    c.g, c.f, c.fb = str(period) .. ':' .. token, 0, 0
    if c.n > 0 or c.b > 0 then
      -- Counted without a generation (an older replica's script, in a rolling upgrade): what is
      -- there may be a floor that script wrote back already. The larger, all of it the floor:
      -- possibly short of what was counted since, never a view counted twice.
      c.n, c.b = math.max(c.n, vn), math.max(c.b, vb)
      c.f, c.fb = c.n, c.b
      return true
    end
  end
  if vn <= c.f and vb <= c.fb then return false end
  if vn > c.f then c.n, c.f = c.n + vn - c.f, vn end
  if vb > c.fb then c.b, c.fb = c.b + vb - c.fb, vb end
  return true
end
"""

# KEYS: rate, conc, day, month, pause
# ARGV: interval_us, burst, max_concurrency, lease_id, lease_ttl_us,
#       requests_per_day, requests_per_month, bytes_per_day (-1: unlimited),
#       concurrency_wait_us (what to report when all slots are taken), now_us ('' for Redis's),
#       and the site as this replica last saw it (seen_at_us '' for never): seen_at_us, day_n,
#       day_bytes, month_n, paused_until, day_generation, month_generation. Counts only grow within
#       their generation, so a view of another generation (Redis restarted empty, or flushed, since)
#       raises the count's floor to it, and a view of the same generation above the stored count
#       means Redis loaded an older snapshot (count_raise); either is written back and the decision
#       taken on it. A heartbeat may notice the loss only seconds later (proxy/replicas.py);
#       admissions in between would have started the quota over. The lease id names a generation
#       this call starts.
#       After the seven, '1' to charge the request whatever the answer ('' not): it has been sent
#       already, admitted ahead on this replica's last view of the site (engine._admit_ahead);
#       the code then says which budget it went past, and the site's state counts it.
# Returns {code, wait_us, now, tat, in_flight, day_n, day_bytes, month_n, paused_until,
#          day_generation, month_generation}.
# code: 0 allowed, 1 paused, 2 requests_per_day, 3 requests_per_month, 4 bytes_per_day,
# 5 rate, 6 concurrency. When several refuse, the one that frees up last is reported (ties: the
# first in that order), so the Retry-After a scraper gets is the one that matters.
ADMIT = Script(
    "admit",
    _PRELUDE
    + """
local rate_key, conc_key, day_key = KEYS[1], KEYS[2], KEYS[3]
local month_key, pause_key = KEYS[4], KEYS[5]
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_conc = tonumber(ARGV[3])
local lease = ARGV[4]
local lease_ttl = tonumber(ARGV[5])
local day_limit = tonumber(ARGV[6])
local month_limit = tonumber(ARGV[7])
local bytes_limit = tonumber(ARGV[8])
local conc_wait = tonumber(ARGV[9])
local now = clock(ARGV[10])
local seen_at = ARGV[11] ~= nil and ARGV[11] ~= '' and tonumber(ARGV[11]) or nil

local code, wait = 0, -1
local function fail(c, w)
  if w > wait then code, wait = c, w end
end

local paused_until = int(redis.call('GET', pause_key))
if seen_at and int(ARGV[15]) > math.max(paused_until, now) then
  paused_until = int(ARGV[15])
  redis.call('SET', pause_key, str(paused_until))
  expire_after(pause_key, paused_until - now)
end
if paused_until > now then fail(1, paused_until - now) end

local day, day_end = utc_day(now)
local dc = count_read(day_key, day)
if seen_at and utc_day(seen_at) == day
    and count_raise(dc, int(ARGV[12]), int(ARGV[13]), ARGV[16] or '', day, lease) then
  count_write(day_key, dc, day, lease, day_end, now, true)
end
local month, month_end = utc_month(now)
local mc = count_read(month_key, month)
if seen_at and utc_month(seen_at) == month
    and count_raise(mc, int(ARGV[14]), 0, ARGV[17] or '', month, lease) then
  count_write(month_key, mc, month, lease, month_end, now, false)
end
if day_limit >= 0 and dc.n >= day_limit then fail(2, day_end - now) end
if month_limit >= 0 and mc.n >= month_limit then fail(3, month_end - now) end
if bytes_limit >= 0 and dc.b >= bytes_limit then fail(4, day_end - now) end

-- GCRA, virtual scheduling: conforming when tat - now <= tau = (burst - 1) * interval.
local tat = math.max(int(redis.call('GET', rate_key)), now)
local tau = (burst - 1) * interval
if tat - now > tau then fail(5, tat - tau - now) end

-- Concurrency slots are leases scored by their expiry: a dead replica's slots lapse by themselves.
redis.call('ZREMRANGEBYSCORE', conc_key, '-inf', str(now))
local cn = redis.call('ZCARD', conc_key)
if cn >= max_conc then
  local oldest = redis.call('ZRANGE', conc_key, 0, 0, 'WITHSCORES')
  -- A slot frees when some response ends, which nobody can predict: report the sooner of the
  -- oldest lease's expiry and a short estimate.
  local frees = now + lease_ttl
  if oldest[2] then frees = tonumber(oldest[2]) end
  fail(6, math.min(frees - now, conc_wait))
end

if code ~= 0 and ARGV[18] ~= '1' then
  return {code, wait, now, tat, cn, dc.n, dc.b, mc.n, paused_until, dc.g, mc.g}
end

local new_tat = tat + interval
redis.call('SET', rate_key, str(new_tat))
expire_after(rate_key, new_tat - now)
redis.call('ZADD', conc_key, str(now + lease_ttl), lease)
expire_after(conc_key, lease_ttl)
dc.n, mc.n = dc.n + 1, mc.n + 1
count_write(day_key, dc, day, lease, day_end, now, true)
count_write(month_key, mc, month, lease, month_end, now, false)
if wait < 0 then wait = 0 end
return {code, wait, now, new_tat, cn + 1, dc.n, dc.b, mc.n, paused_until, dc.g, mc.g}
""",
)

# KEYS: conc, day.  ARGV: lease_id ('' for none), response_bytes, now_us ('' for Redis's),
#                      token (names the generation of a day count this call starts)
# Frees the lease and adds the bytes to today's count (the day the response ended, UTC).
SETTLE = Script(
    "settle",
    _PRELUDE
    + """
local now = clock(ARGV[3])
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[1], ARGV[1]) end
local bytes = tonumber(ARGV[2])
if bytes > 0 then
  local day, day_end = utc_day(now)
  local c = count_read(KEYS[2], day)
  c.b = c.b + bytes
  count_write(KEYS[2], c, day, ARGV[4], day_end, now, true)
end
return 1
""",
)

# KEYS: conc.  ARGV: lease_ttl_us, now_us ('' for TIME), lease_id...
# Extends leases that are still live; a lapsed lease is not revived.
RENEW = Script(
    "renew",
    _PRELUDE
    + """
local now = clock(ARGV[2])
local ttl = tonumber(ARGV[1])
local n = 0
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', KEYS[1], str(now + ttl), ARGV[i])
    n = n + 1
  end
end
if n > 0 then expire_after(KEYS[1], ttl) end
return n
""",
)

# KEYS: pause, backoff.  ARGV: pause_us (-1: back off), base_us, cap_us, reset_us, now_us ('' for
#       Redis's), and optionally a channel and the site: '<microseconds left> <site>' is published
#       there, so that every replica holds the pause at once (engine._room_ahead).
# Returns the microseconds the site stays paused. A pause only ever grows. Backing off doubles
# from `base` up to `cap` for each throttling answer after the previous pause ended (answers to
# requests sent before it do not escalate), and starts over `reset` after a pause ends quietly.
PAUSE = Script(
    "pause",
    _PRELUDE
    + """
local now = clock(ARGV[5])
local want = tonumber(ARGV[1])
local paused_until = int(redis.call('GET', KEYS[1]))
if want < 0 then
  if paused_until > now then return paused_until - now end
  local b = redis.call('HMGET', KEYS[2], 'level', 'expires')
  local level = 0
  if int(b[2]) > now then level = int(b[1]) end
  level = math.min(level + 1, 40)
  want = math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ (level - 1))
  local expires = now + want + tonumber(ARGV[4])
  redis.call('HSET', KEYS[2], 'level', str(level), 'expires', str(expires))
  expire_after(KEYS[2], expires - now)
end
paused_until = math.max(paused_until, now + want)
redis.call('SET', KEYS[1], str(paused_until))
expire_after(KEYS[1], paused_until - now)
if ARGV[6] and ARGV[6] ~= '' then
  -- pcall: a user whose ACL does not let it publish there still stores the pause
  redis.pcall('PUBLISH', ARGV[6], str(paused_until - now) .. ' ' .. ARGV[7])
end
return paused_until - now
""",
)

# KEYS: rate, conc, day, month, pause.  ARGV: [now_us]
# Returns {now, tat, in_flight, day_n, day_bytes, month_n, paused_until, day_generation,
# month_generation}; reads only.
USAGE = Script(
    "usage",
    _PRELUDE
    + """
local now = clock(ARGV[1])
local tat = math.max(int(redis.call('GET', KEYS[1])), now)
local cn = redis.call('ZCOUNT', KEYS[2], '(' .. str(now), '+inf')
local dc = count_read(KEYS[3], utc_day(now))
local mc = count_read(KEYS[4], utc_month(now))
return {now, tat, cn, dc.n, dc.b, mc.n, int(redis.call('GET', KEYS[5])), dc.g, mc.g}
""",
)

# KEYS: day, month, pause.
# ARGV: day_id, day_n, day_bytes, month_id, month_n, paused_for_us, now_us ('' for Redis's), mode,
#       day_generation, month_generation, token (names a generation this call starts)
# Usage counted elsewhere, for the periods that are still current: added to the stored counts
# (mode 'add': counted while Redis was unreachable), or raising them where they show a loss
# (mode 'max': what a replica last saw, of the generation given, written back after Redis lost
# it; count_raise). A second replica's floor then never swallows the first one's outage counts.
CARRY_OVER = Script(
    "carry_over",
    _PRELUDE
    + """
local now = clock(ARGV[7])
local at_least = ARGV[8] == 'max'
local token = ARGV[11]
local day, day_end = utc_day(now)
local dn, db = tonumber(ARGV[2]), tonumber(ARGV[3])
if tonumber(ARGV[1]) == day and (dn > 0 or db > 0) then
  local c = count_read(KEYS[1], day)
  local changed = true
  if at_least then
    changed = count_raise(c, dn, db, ARGV[9], day, token)
  else
    c.n, c.b = c.n + dn, c.b + db
  end
  if changed then count_write(KEYS[1], c, day, token, day_end, now, true) end
end
local month, month_end = utc_month(now)
local mn = tonumber(ARGV[5])
if tonumber(ARGV[4]) == month and mn > 0 then
  local c = count_read(KEYS[2], month)
  local changed = true
  if at_least then
    changed = count_raise(c, mn, 0, ARGV[10], month, token)
  else
    c.n = c.n + mn
  end
  if changed then count_write(KEYS[2], c, month, token, month_end, now, false) end
end
local pf = tonumber(ARGV[6])
if pf > 0 then
  local paused_until = math.max(int(redis.call('GET', KEYS[3])), now + pf)
  redis.call('SET', KEYS[3], str(paused_until))
  expire_after(KEYS[3], paused_until - now)
end
return 1
""",
)

# Test only: the calendar functions of the prelude, to hold them against Python's datetime.
# ARGV: now_us.  Returns {day_id, day_end, month_id, month_end}.
CALENDAR = Script(
    "calendar",
    _PRELUDE
    + """
local now = tonumber(ARGV[1])
local day, day_end = utc_day(now)
local month, month_end = utc_month(now)
return {day, day_end, month, month_end}
""",
)

ALL = (ADMIT, SETTLE, RENEW, PAUSE, USAGE, CARRY_OVER)
