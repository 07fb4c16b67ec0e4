"""The Redis backend's server-side scripts: every change of state is one Lua script, so it is
atomic on the server however many workers share the queue.

Layout under the prefix ``P`` (``conveyor:`` by default)::

    P j:<id>              hash: the job (see ``FIELDS`` in redis.py)
    P seq                 counter: enqueue order
    P expiry              zset: done jobs by keep_until
    P q:<q>:runat         zset: every queued job, by run_at (counts)
    P q:<q>:ready         zset, all scores 0: claimable jobs as "<priority><seq><id>" members,
                          so the first member is the next claim
    P q:<q>:delayed       zset: placed jobs waiting for run_at
    P q:<q>:leases        zset: running jobs by lease_until
    P q:<q>:done, :dead, :aborted   sets
    P q:<q>:waiting       set: jobs waiting for others to be done (their hash: waits_for, then
                          as JSON [[id, place], ...], and each input's result as in:<place>)
    P q:<q>:k:<key>       zset: the key's queued jobs, by seq
    P q:<q>:kplaced       hash: key -> the one job of that key in ready/delayed
    P q:<q>:krun          set: keys with a running job
    P wake:<q>            channel: something may have become claimable
    P ended:<id>          channel: the job ended (done or dead)
    P schedules           hash: schedule name -> its record (JSON)
    P lim:<group>         hash: a concurrency limit's places, run token -> job id
    P park:<group>        zset: the jobs waiting for a place, in order
    P rate:<group>        hash: a rate's bucket (tokens, at)
    P resv:<group>        zset: the jobs a rate refused, each holding a start, by when

A job without a key is "placed" (in ready or delayed) whenever it is queued. A keyed job is
placed only while it is the first queued job of its key and no job of its key runs; the others
wait in the key's zset. Claims therefore never skip anything: the first members of ready are
exactly the jobs to hand out.

Times arrive as strings from Python and are stored as given: Lua's numbers would print them
with 14 digits and lose the sub-millisecond part.

All or nothing. Redis does not roll back a script that fails midway, so a script that changes
state first checks every key it may write (``check_queue``, ``check_job``: each is what
conveyor keeps there, or absent) and only then writes; a key of the wrong type under the
prefix fails the call whole, with an error naming the key. Scripts are declared with a
``#!lua`` line, so a server out of memory (``noeviction``) or read-only (a replica) refuses
them before they start; the two that only read say ``no-writes`` and run even then.
"""

from __future__ import annotations

WRITES = "#!lua\n"
READS = "#!lua flags=no-writes\n"

PRELUDE = r"""
local P = ARGV[1]
local function jk(id) return P .. 'j:' .. id end
local function qk(q, part) return P .. 'q:' .. q .. ':' .. part end
local function wake(q) redis.call('PUBLISH', P .. 'wake:' .. q, '1') end

-- keys already checked in this call, with their kind
local checked = {}
local function expect(key, kind)
  if checked[key] then return end
  local t = redis.call('TYPE', key)['ok']
  if t ~= kind and t ~= 'none' then
    error({err = 'conveyor:wrongtype ' .. key .. ' is a ' .. t .. ', where conveyor keeps a '
      .. kind})
  end
  checked[key] = kind
end

-- every key of queue ``q`` (and the shared ones) that a change may write
local function check_queue(q)
  local mark = qk(q, '')  -- no key is named so: the queue as a whole
  if checked[mark] then return end
  checked[mark] = 'queue'
  expect(P .. 'seq', 'string')
  expect(P .. 'expiry', 'zset')
  for _, part in ipairs({'runat', 'ready', 'delayed', 'leases'}) do expect(qk(q, part), 'zset') end
  for _, part in ipairs({'done', 'dead', 'krun', 'waiting', 'aborted'}) do
    expect(qk(q, part), 'set')
  end
  expect(qk(q, 'kplaced'), 'hash')
end

-- the keys a change of one of ``q``'s keys may write: its line, and the jobs at its head
local function check_key(q, key)
  local line = qk(q, 'k:' .. key)
  if checked[line] then return end
  expect(line, 'zset')
  local head = redis.call('ZRANGE', line, 0, 0)[1]
  if head then expect(jk(head), 'hash') end
  local placed = redis.call('HGET', qk(q, 'kplaced'), key)
  if placed then expect(jk(placed), 'hash') end
end

-- ``fields`` of job ``id`` (HMGET), after checking that its key holds a hash: a read that a
-- claim or a completion goes on with, so the check costs no call of its own
local function job_fields(id, ...)
  local k = jk(id)
  local f = redis.pcall('HMGET', k, ...)
  if f['err'] then
    error({err = 'conveyor:wrongtype ' .. k .. ' is a ' .. redis.call('TYPE', k)['ok']
      .. ', where conveyor keeps a hash'})
  end
  checked[k] = 'hash'
  return f
end

-- ``redis.call(cmd, key, ...)`` with the values of ``list`` as arguments, a thousand at a time
local function each_thousand(cmd, key, list)
  for i = 1, #list, 1000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 999, #list)))
  end
end

-- a job that a change may touch: its hash, its queue's keys and its key's
local function check_job(id)
  local k = jk(id)
  if checked[k] then return end
  expect(k, 'hash')
  local f = redis.call('HMGET', k, 'queue', 'key')
  if f[1] then check_queue(f[1]) end
  if f[1] and f[2] then check_key(f[1], f[2]) end
end

-- priority first (higher first), then enqueue order; 9 + 14 hex digits, then the id
local function member(id, prio, seq)
  return string.format('%09x%014x', 4294967296 - tonumber(prio), tonumber(seq)) .. id
end

local function place(id, now)
  local f = redis.call('HMGET', jk(id), 'queue', 'priority', 'seq', 'run_at')
  if tonumber(f[4]) <= tonumber(now) then
    redis.call('ZADD', qk(f[1], 'ready'), 0, member(id, f[2], f[3]))
  else
    redis.call('ZADD', qk(f[1], 'delayed'), f[4], id)
  end
end

local function unplace(id)
  local f = redis.call('HMGET', jk(id), 'queue', 'priority', 'seq')
  redis.call('ZREM', qk(f[1], 'ready'), member(id, f[2], f[3]))
  redis.call('ZREM', qk(f[1], 'delayed'), id)
end

-- after any change to a key's jobs: its first queued job is placed, unless the key runs
local function settle_key(q, key, now)
  local placed = redis.call('HGET', qk(q, 'kplaced'), key)
  local head = false
  if redis.call('SISMEMBER', qk(q, 'krun'), key) == 0 then
    head = redis.call('ZRANGE', qk(q, 'k:' .. key), 0, 0)[1] or false
  end
  if head == placed then return end
  if placed then unplace(placed) end
  if head then
    place(head, now)
    redis.call('HSET', qk(q, 'kplaced'), key, head)
  else
    redis.call('HDEL', qk(q, 'kplaced'), key)
  end
end

-- the job (its hash already says queued) joins the line, at the place its seq gives it
local function to_queue(id, now)
  local f = redis.call('HMGET', jk(id), 'queue', 'key', 'seq', 'run_at', 'priority')
  redis.call('ZADD', qk(f[1], 'runat'), f[4], id)
  if f[2] then
    redis.call('ZADD', qk(f[1], 'k:' .. f[2]), f[3], id)
    settle_key(f[1], f[2], now)
  elseif tonumber(f[4]) <= tonumber(now) then
    redis.call('ZADD', qk(f[1], 'ready'), 0, member(id, f[5], f[3]))
  else
    redis.call('ZADD', qk(f[1], 'delayed'), f[4], id)
  end
end

-- a queued job leaves the line (finished, forgotten); the caller settles its key
local function leave_queue(id, q, key)
  redis.call('ZREM', qk(q, 'runat'), id)
  unplace(id)
  if key then
    redis.call('ZREM', qk(q, 'k:' .. key), id)
    if redis.call('HGET', qk(q, 'kplaced'), key) == id then
      redis.call('HDEL', qk(q, 'kplaced'), key)
    end
  end
end

local function leave_running(id, q, key, now)
  redis.call('ZREM', qk(q, 'leases'), id)
  if key then
    redis.call('SREM', qk(q, 'krun'), key)
    settle_key(q, key, now)
  end
end

-- remove a job that is not running, wherever it is
local function forget(id)
  local f = redis.call('HMGET', jk(id), 'queue', 'key', 'state')
  local q, key, state = f[1], f[2], f[3]
  if state == 'queued' then
    leave_queue(id, q, key)
  elseif state == 'done' then
    redis.call('SREM', qk(q, 'done'), id)
    redis.call('ZREM', P .. 'expiry', id)
  elseif state == 'dead' then
    redis.call('SREM', qk(q, 'dead'), id)
  elseif state == 'waiting' then
    redis.call('SREM', qk(q, 'waiting'), id)
  elseif state == 'aborted' then
    redis.call('SREM', qk(q, 'aborted'), id)
  end
  redis.call('DEL', jk(id))
  return q, key, state
end

-- the job's hash if ``token`` holds it: {queue, key}, else nil
local function held(id, token)
  local f = redis.call('HMGET', jk(id), 'state', 'token', 'queue', 'key')
  if f[1] == 'running' and f[2] == token then return f end
  return nil
end

-- a call sent again after a lost connection: did its first sending already end the lease?
local function replayed(id, token, replay)
  return replay == '1' and redis.call('HGET', jk(id), 'ended') == token
end

-- the attempt under way at ``id`` ended ``at`` as ``outcome``: append it to the job's history
-- (JSON lines; times as the strings they are stored as), with ``err`` if any (as Python cut
-- it: by characters, where a cut here would count bytes and could split one)
local function remember(id, outcome, at, err)
  local k = jk(id)
  local f = redis.call('HMGET', k, 'attempts', 'worker', 'started_at', 'history')
  local entry = {n = tonumber(f[1]), outcome = outcome, ended_at = at or nil}
  if f[2] then entry.worker = f[2] end
  if f[3] then entry.started_at = f[3] end
  if err then entry.error = err end
  redis.call('HSET', k, 'history', (f[4] or '') .. cjson.encode(entry) .. '\n')
end

-- end the lease held by ``token``; returns {queue, key} or nil
local function end_lease(id, token, now)
  local f = held(id, token)
  if not f then return nil end
  leave_running(id, f[3], f[4], now)
  redis.call('HDEL', jk(id), 'token', 'lease_until')
  redis.call('HSET', jk(id), 'ended', token)
  return f
end

-- the fields of job ``id``, or {} if no job hash is there
local function fields_of(id, ...)
  if redis.call('TYPE', jk(id))['ok'] ~= 'hash' then return {} end
  return redis.call('HMGET', jk(id), ...)
end

-- the jobs waiting for ``id``: its 'then' field, {dependent, place} pairs
local function dependents(id)
  local raw = redis.call('HGET', jk(id), 'then')
  if not raw or raw == '' then return {} end
  return cjson.decode(raw)
end

-- before any write: check every key that telling the jobs waiting for ``id`` may touch (all
-- those waiting behind it, when ``dead``: they die with it)
local function check_follow(id, dead)
  local seen = {}
  local stack = {id}
  while #stack > 0 do
    local current = table.remove(stack)
    for _, pair in ipairs(dependents(current)) do
      local dep = pair[1]
      if not seen[dep] then
        seen[dep] = true
        check_job(dep)
        if dead and redis.call('HGET', jk(dep), 'state') == 'waiting' then
          stack[#stack + 1] = dep
        end
      end
    end
  end
end

-- ``id`` is done with ``result`` (false: none): each job waiting for it takes the result at
-- its place and counts down; one that waits for nothing more is queued
local function follow_done(id, result, now)
  for _, pair in ipairs(dependents(id)) do
    local dep, where = pair[1], pair[2]
    local k = jk(dep)
    if redis.call('HGET', k, 'state') == 'waiting' then
      redis.call('HSET', k, 'in:' .. where, result or '')
      if redis.call('HINCRBY', k, 'waits_for', -1) <= 0 then
        local q = redis.call('HGET', k, 'queue')
        redis.call('SREM', qk(q, 'waiting'), dep)
        redis.call('HSET', k, 'state', 'queued')
        to_queue(dep, now)
        wake(q)
      end
    end
  end
end

-- ``id`` is dead: every job waiting for it (and for those) is dead too, with the reason
local function follow_dead(id, now)
  local stack = {id}
  while #stack > 0 do
    local current = table.remove(stack)
    local f = redis.call('HMGET', jk(current), 'task', 'error')
    local why = 'not run: job ' .. current .. ' (' .. (f[1] or '') .. '), which it waited for, '
      .. 'is dead:\n' .. string.sub(f[2] or '', -4000)
    for _, pair in ipairs(dependents(current)) do
      local dep = pair[1]
      local k = jk(dep)
      if redis.call('HGET', k, 'state') == 'waiting' then
        local q = redis.call('HGET', k, 'queue')
        redis.call('SREM', qk(q, 'waiting'), dep)
        redis.call('HSET', k, 'state', 'dead', 'error', why, 'finished_at', now)
        redis.call('SADD', qk(q, 'dead'), dep)
        redis.call('PUBLISH', P .. 'ended:' .. dep, 'dead')
        stack[#stack + 1] = dep
      end
    end
  end
end

-- enqueue the jobs given from ARGV[first] on, 9 values each (see redis.py), at ``now``;
-- per job, 0 if added, or the fields of the job already there
local function enqueue_from(first, now)
  local out = {}
  local woken = {}
  -- what is there already at each id, read once; a fresh id writes only its hash, seq, runat
  -- and the one index it joins, so only those are checked
  local there, added = {}, {}
  for i = first, #ARGV, 9 do
    local q = ARGV[i + 1]
    local st = job_fields(ARGV[i], 'state', 'keep_until', 'queue', 'key')
    there[i] = st
    if st[1] then  -- the job there may be forgotten, which writes its queue's and its key's
      if st[3] then check_queue(st[3]) end
      if st[3] and st[4] then check_key(st[3], st[4]) end
    end
    expect(P .. 'seq', 'string')
    expect(qk(q, 'runat'), 'zset')
    if ARGV[i + 5] ~= '' then
      check_queue(q)
      check_key(q, ARGV[i + 5])
    elseif tonumber(ARGV[i + 7]) > 0 then
      expect(qk(q, 'waiting'), 'set')
    elseif tonumber(ARGV[i + 6]) <= tonumber(now) then
      expect(qk(q, 'ready'), 'zset')
    else
      expect(qk(q, 'delayed'), 'zset')
    end
  end
  -- the places of unkeyed jobs in their sorted sets, added a set at a time at the end (no
  -- later change in this call reads them); one INCRBY numbers every job of the call
  local adds = {}
  local function later(key, score, m)
    local list = adds[key]
    if not list then
      list = {}
      adds[key] = list
    end
    list[#list + 1] = score
    list[#list + 1] = m
  end
  local count = (#ARGV - first + 1) / 9
  local seq = redis.call('INCRBY', P .. 'seq', count) - count
  for i = first, #ARGV, 9 do
    local id, q = ARGV[i], ARGV[i + 1]
    local k = jk(id)
    local st = there[i]
    local keep = true
    if added[id] then  -- the same id earlier in this call
      keep = false
    elseif st[1] == 'dead' or st[1] == 'aborted'
      or (st[1] == 'done' and st[2] and tonumber(st[2]) <= tonumber(now)) then
      forget(id)
    elseif st[1] then
      keep = false
    end
    if keep then added[id] = true end
    if keep then
      seq = seq + 1
      local run_at = ARGV[i + 6]
      redis.call('HSET', k, 'id', id, 'queue', q, 'task', ARGV[i + 2], 'payload', ARGV[i + 3],
        'state', 'queued', 'priority', ARGV[i + 4], 'attempts', 0, 'enqueued_at', now,
        'run_at', run_at, 'seq', seq)
      if ARGV[i + 5] ~= '' then redis.call('HSET', k, 'key', ARGV[i + 5]) end
      if ARGV[i + 8] ~= '' then redis.call('HSET', k, 'then', ARGV[i + 8]) end
      if tonumber(ARGV[i + 7]) > 0 then
        redis.call('HSET', k, 'state', 'waiting', 'waits_for', ARGV[i + 7])
        redis.call('SADD', qk(q, 'waiting'), id)
      elseif ARGV[i + 5] ~= '' then
        to_queue(id, now)
      else
        later(qk(q, 'runat'), run_at, id)
        if tonumber(run_at) <= tonumber(now) then
          later(qk(q, 'ready'), 0, member(id, ARGV[i + 4], seq))
        else
          later(qk(q, 'delayed'), run_at, id)
        end
      end
      woken[q] = true
      out[#out + 1] = 0
    else
      out[#out + 1] = redis.call('HGETALL', k)
    end
  end
  for key, pairs_ in pairs(adds) do each_thousand('ZADD', key, pairs_) end
  for q, _ in pairs(woken) do wake(q) end
  return out
end
"""

# ARGV: P, now, whole ('1': add all or none), then per job: id, queue, task, payload, priority,
# key ('' for none), run_at, waits_for, then (JSON, '' for none). Returns per job 0 (added) or
# the existing job's fields; with whole and an id taken, -1 then per job 0 (free) or fields.
# Returns per job 0 (added) or the existing job's fields.
ENQUEUE = r"""
if ARGV[3] == '1' then  -- whole: if any id is taken, add none
  local out, taken = {-1}, false
  for i = 4, #ARGV, 9 do
    local st = job_fields(ARGV[i], 'state', 'keep_until')
    local free = not st[1] or st[1] == 'dead' or st[1] == 'aborted'
      or (st[1] == 'done' and st[2] and tonumber(st[2]) <= tonumber(ARGV[2]))
    if free then out[#out + 1] = 0 else
      taken = true
      out[#out + 1] = redis.call('HGETALL', jk(ARGV[i]))
    end
  end
  if taken then return out end
end
return enqueue_from(4, ARGV[2])
"""

# ARGV: P, name, the record expected ('' for none), the new record ('' to remove), now, then
# jobs as for ENQUEUE. Returns 1 if swapped (and the jobs enqueued), 0 if the record differed.
SWAP_SCHEDULE = r"""
local key = P .. 'schedules'
expect(key, 'hash')
local current = redis.call('HGET', key, ARGV[2])
if (current or '') ~= ARGV[3] then return 0 end
enqueue_from(6, ARGV[5])  -- checks every key it writes before the first write
if ARGV[4] == '' then
  redis.call('HDEL', key, ARGV[2])
else
  redis.call('HSET', key, ARGV[2], ARGV[4])
end
return 1
"""


# ARGV: P, queue, now, lease_until, limit, token prefix, worker. Returns the claimed jobs' fields.
CLAIM = r"""
local q, now, lease_until, limit, base = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local worker = ARGV[7]
local ready, leases, delayed, runat = qk(q, 'ready'), qk(q, 'leases'), qk(q, 'delayed'),
  qk(q, 'runat')
expect(leases, 'zset')
expect(delayed, 'zset')
local lapsed = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, 1000)
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
-- what a claim hands out comes from the head of ready, or from what lapsed or fell due; a
-- claim with nothing lapsed or due writes only ready, runat, leases and the jobs it takes
if #lapsed > 0 or #due > 0 then
  check_queue(q)
  for _, id in ipairs(lapsed) do check_job(id) end
  for _, id in ipairs(due) do check_job(id) end
end
-- the fields of the jobs at the head (key, attempts), read once: for the check and the claim
local head = {}
if limit > 0 then
  expect(ready, 'zset')
  expect(runat, 'zset')
  for _, m in ipairs(redis.call('ZRANGE', ready, 0, limit - 1)) do
    local id = string.sub(m, 24)
    local f = job_fields(id, 'key', 'attempts')
    if f[1] then
      check_queue(q)
      check_key(q, f[1])
    end
    head[id] = f
  end
end
for _, id in ipairs(lapsed) do
  local key = redis.call('HGET', jk(id), 'key')
  leave_running(id, q, key, now)
  remember(id, 'lost', redis.call('HGET', jk(id), 'lease_until'), false)
  redis.call('HSET', jk(id), 'state', 'queued')
  redis.call('HINCRBY', jk(id), 'lost', 1)
  redis.call('HDEL', jk(id), 'token', 'lease_until')
  to_queue(id, now)
end
for _, id in ipairs(due) do
  redis.call('ZREM', delayed, id)
  local f = redis.call('HMGET', jk(id), 'priority', 'seq')
  redis.call('ZADD', ready, 0, member(id, f[1], f[2]))
end
local taken = {}
if limit < 1 then return taken end
-- all scores are 0: ZPOPMIN takes the first members, which are the next claims
local firsts = redis.call('ZPOPMIN', ready, limit)
local ids, scored = {}, {}
for n = 1, #firsts / 2 do
  local id = string.sub(firsts[2 * n - 1], 24)
  local k = jk(id)
  -- neither a lapse nor a fall due changes a job's key or attempts
  local f = head[id] or redis.call('HMGET', k, 'key', 'attempts')
  local key = f[1]
  if key then
    redis.call('ZREM', qk(q, 'k:' .. key), id)
    redis.call('HDEL', qk(q, 'kplaced'), key)
    redis.call('SADD', qk(q, 'krun'), key)
  end
  redis.call('HSET', k, 'state', 'running', 'token', base .. n, 'lease_until', lease_until,
    'worker', worker, 'started_at', now, 'attempts', (tonumber(f[2]) or 0) + 1)
  ids[n] = id
  scored[2 * n - 1] = lease_until
  scored[2 * n] = id
  taken[n] = redis.call('HGETALL', k)
end
each_thousand('ZREM', runat, ids)
each_thousand('ZADD', leases, scored)
return taken
"""

# ARGV: P, lease_until, replay, then pairs id, token. Returns 1/0 per pair.
HEARTBEAT = r"""
local out = {}
for i = 4, #ARGV, 2 do check_job(ARGV[i]) end
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local f = held(id, ARGV[i + 1])
  if f then
    redis.call('HSET', jk(id), 'lease_until', ARGV[2])
    redis.call('ZADD', qk(f[3], 'leases'), ARGV[2], id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# ARGV: P, now, replay, then per job: id, token, has_result ('1'/'0'), result,
# keep_until ('' for forever). Returns 1/0 per job.
COMPLETE = r"""
local now, replay = ARGV[2], ARGV[3]
local out = {}
local woken = {}
-- each job's state, token, queue, key and followers, read once: for the checks and the change
local rows = {}
for i = 4, #ARGV, 5 do
  local f = job_fields(ARGV[i], 'state', 'token', 'queue', 'key', 'then')
  rows[i] = f
  if f[3] then
    expect(qk(f[3], 'leases'), 'zset')
    expect(qk(f[3], 'done'), 'set')
    if f[4] then
      check_queue(f[3])
      check_key(f[3], f[4])
    end
  end
  if ARGV[i + 4] ~= '' then expect(P .. 'expiry', 'zset') end
  if f[5] and f[5] ~= '' then check_follow(ARGV[i], false) end
end
local finished, ended, expiring = {}, {}, {}
for i = 4, #ARGV, 5 do
  local id, token, keep = ARGV[i], ARGV[i + 1], ARGV[i + 4]
  local f = rows[i]
  if f[1] == 'running' and f[2] == token and not finished[id] then
    finished[id] = true
    local q, key, k = f[3], f[4], jk(id)
    if key then
      leave_running(id, q, key, now)
      woken[q] = true
    else
      -- unkeyed jobs leave the leases (and join done) a queue at a time, below
      ended[q] = ended[q] or {}
      table.insert(ended[q], id)
    end
    redis.call('HDEL', k, 'token', 'lease_until')
    -- a running job has neither a result nor a keep_until: only set what there is
    local set = {'ended', token, 'state', 'done', 'finished_at', now}
    if ARGV[i + 2] == '1' then
      set[#set + 1] = 'result'
      set[#set + 1] = ARGV[i + 3]
    end
    if keep ~= '' then
      set[#set + 1] = 'keep_until'
      set[#set + 1] = keep
      expiring[#expiring + 1] = keep
      expiring[#expiring + 1] = id
    end
    redis.call('HSET', k, unpack(set))
    if key then redis.call('SADD', qk(q, 'done'), id) end
    redis.call('PUBLISH', P .. 'ended:' .. id, 'done')
    if f[5] and f[5] ~= '' then follow_done(id, ARGV[i + 2] == '1' and ARGV[i + 3], now) end
    out[#out + 1] = 1
  elseif replayed(id, token, replay) then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
for q, ids in pairs(ended) do
  each_thousand('ZREM', qk(q, 'leases'), ids)
  each_thousand('SADD', qk(q, 'done'), ids)
end
each_thousand('ZADD', P .. 'expiry', expiring)
for q, _ in pairs(woken) do wake(q) end
return out
"""

# ARGV: P, now, replay, id, token, run_at, error, the error as the history keeps it
RETRY = r"""
local now, replay, id, token = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
check_job(id)
local f = end_lease(id, token, now)
if not f then return replayed(id, token, replay) and 1 or 0 end
redis.call('HSET', jk(id), 'state', 'queued', 'run_at', ARGV[6], 'error', ARGV[7])
remember(id, 'retried', now, ARGV[8])
to_queue(id, now)
wake(f[3])
return 1
"""

# ARGV: P, now, replay, id, token, error, the error as the history keeps it
FAIL = r"""
local now, replay, id, token = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
check_job(id)
check_follow(id, true)
local f = end_lease(id, token, now)
if not f then return replayed(id, token, replay) and 1 or 0 end
redis.call('HSET', jk(id), 'state', 'dead', 'error', ARGV[6], 'finished_at', now)
remember(id, 'dead', now, ARGV[7])
redis.call('SADD', qk(f[3], 'dead'), id)
redis.call('PUBLISH', P .. 'ended:' .. id, 'dead')
follow_dead(id, now)
if f[4] then wake(f[3]) end
return 1
"""

# ARGV: P, now, replay, id, token, run_at
RELEASE = r"""
local now, replay, id, token = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
check_job(id)
local f = end_lease(id, token, now)
if not f then return replayed(id, token, replay) and 1 or 0 end
local k = jk(id)
local attempts = tonumber(redis.call('HGET', k, 'attempts'))
if attempts > 0 then attempts = attempts - 1 end
redis.call('HSET', k, 'state', 'queued', 'run_at', ARGV[6] or now, 'attempts', attempts)
to_queue(id, now)
wake(f[3])
return 1
"""

# ARGV: P, now, id
FINISH = r"""
local now, id = ARGV[2], ARGV[3]
check_job(id)
check_queue('')
local k = jk(id)
local f = redis.call('HMGET', k, 'state', 'queue', 'key')
local state, q, key = f[1], f[2], f[3]
check_follow(id, false)
if not state then
  q = ''
  redis.call('HSET', k, 'id', id, 'queue', '', 'task', '', 'payload', '', 'priority', 0,
    'attempts', 0, 'enqueued_at', now, 'run_at', now, 'seq', redis.call('INCR', P .. 'seq'))
elseif state == 'queued' then
  leave_queue(id, q, key)
  if key then settle_key(q, key, now) end
  wake(q)
elseif state == 'running' then
  leave_running(id, q, key, now)
  redis.call('HDEL', k, 'token', 'lease_until')
  if key then wake(q) end
elseif state == 'dead' then
  redis.call('SREM', qk(q, 'dead'), id)
elseif state == 'waiting' then
  redis.call('SREM', qk(q, 'waiting'), id)
end
redis.call('ZREM', P .. 'expiry', id)
redis.call('HDEL', k, 'keep_until')
redis.call('HSET', k, 'state', 'done', 'finished_at', now)
redis.call('SADD', qk(q, 'done'), id)
redis.call('PUBLISH', P .. 'ended:' .. id, 'done')
if state ~= 'done' then follow_done(id, false, now) end
"""

# ARGV: P, id, token, fraction, note
PROGRESS = r"""
local id = ARGV[2]
check_job(id)
if not held(id, ARGV[3]) then return 0 end
redis.call('HSET', jk(id), 'progress', ARGV[4], 'progress_note', ARGV[5])
return 1
"""

# ARGV: P, now, id, reason
CANCEL = r"""
local now, id, reason = ARGV[2], ARGV[3], ARGV[4]
check_job(id)
local k = jk(id)
local f = redis.call('HMGET', k, 'state', 'queue', 'key')
if f[1] ~= 'queued' and f[1] ~= 'waiting' then return 0 end
check_follow(id, true)
local q, key = f[2], f[3]
if f[1] == 'queued' then
  leave_queue(id, q, key)
  if key then settle_key(q, key, now) end
else
  redis.call('SREM', qk(q, 'waiting'), id)
end
redis.call('HSET', k, 'state', 'dead', 'error', reason, 'finished_at', now)
redis.call('SADD', qk(q, 'dead'), id)
redis.call('PUBLISH', P .. 'ended:' .. id, 'dead')
follow_dead(id, now)
wake(q)
return 1
"""

# ARGV: P, now, id, by. Returns 'aborted', 'requested', or the state it had ('unknown').
ABORT = r"""
local now, id, by = ARGV[2], ARGV[3], ARGV[4]
check_job(id)
local k = jk(id)
local f = redis.call('HMGET', k, 'state', 'queue', 'key')
local state, q, key = f[1], f[2], f[3]
if not state then return 'unknown' end
if state == 'running' then
  redis.call('HSET', k, 'abort_by', by)
  return 'requested'
end
if state ~= 'queued' and state ~= 'waiting' then return state end
check_follow(id, true)
if state == 'queued' then
  leave_queue(id, q, key)
  if key then settle_key(q, key, now) end
else
  redis.call('SREM', qk(q, 'waiting'), id)
end
redis.call('HSET', k, 'state', 'aborted', 'abort_by', by, 'error', 'aborted by ' .. by,
  'finished_at', now)
redis.call('SADD', qk(q, 'aborted'), id)
redis.call('PUBLISH', P .. 'ended:' .. id, 'aborted')
follow_dead(id, now)
wake(q)
return 'aborted'
"""

# ARGV: P, now, replay, id, token
ABORTED = r"""
local now, replay, id, token = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
check_job(id)
check_follow(id, true)
local f = end_lease(id, token, now)
if not f then return replayed(id, token, replay) and 1 or 0 end
local err = 'aborted by ' .. (redis.call('HGET', jk(id), 'abort_by') or '?')
redis.call('HSET', jk(id), 'state', 'aborted', 'error', err, 'finished_at', now)
remember(id, 'aborted', now, err)
redis.call('SADD', qk(f[3], 'aborted'), id)
redis.call('PUBLISH', P .. 'ended:' .. id, 'aborted')
follow_dead(id, now)
if f[4] then wake(f[3]) end
return 1
"""

# ARGV: P, job id, token, now, PARKED_S, then per limit: group, concurrency ('' for none),
# rate's starts ('' for none), rate's seconds. Returns nil (places taken) or the seconds to
# wait, as a string (the job then handed back, claimable from now + that wait).
ACQUIRE = r"""
local job_id, token, now, parked_s = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
expect(jk(job_id), 'hash')
-- a run that does not hold the job (any more) must not start
if not held(job_id, token) then return ARGV[5] end
for i = 6, #ARGV, 4 do
  expect(P .. 'lim:' .. ARGV[i], 'hash')
  expect(P .. 'park:' .. ARGV[i], 'zset')
  expect(P .. 'rate:' .. ARGV[i], 'hash')
  expect(P .. 'resv:' .. ARGV[i], 'zset')
end
local wait = 0
local full, starts, reserves = {}, {}, {}
for i = 6, #ARGV, 4 do
  local group, most, n, per = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if most ~= '' then
    local key = P .. 'lim:' .. group
    local holders = redis.call('HGETALL', key)
    local count = 0
    for j = 1, #holders, 2 do
      local held, holder = holders[j], holders[j + 1]
      local f = fields_of(holder, 'state', 'token')
      if f[1] == 'running' and f[2] == held then
        if held ~= token then count = count + 1 end
      else
        redis.call('HDEL', key, held)  -- that run is over: its place is free again
      end
    end
    if count >= tonumber(most) then
      full[#full + 1] = group
      wait = math.max(wait, parked_s)
    end
  end
  if n ~= '' then
    -- a bucket that may go below zero: each refused job holds a start of its own (see
    -- base.rate_step), so the refused come back one interval apart
    local cap, period = tonumber(n), tonumber(per)
    local booked_key = P .. 'resv:' .. group
    redis.call('ZREMRANGEBYSCORE', booked_key, '-inf', now - math.max(60, 10 * period))
    local st = redis.call('HMGET', P .. 'rate:' .. group, 'tokens', 'at')
    local tokens = tonumber(st[1]) or cap
    local at = tonumber(st[2]) or now
    tokens = math.min(cap, tokens + math.max(0, now - at) * cap / period)
    local booked = redis.call('ZSCORE', booked_key, job_id)
    if booked then
      if tonumber(booked) <= now + 0.001 then
        starts[#starts + 1] = {group, tokens}
      else
        wait = math.max(wait, tonumber(booked) - now)
      end
    elseif tokens >= 1 then
      starts[#starts + 1] = {group, tokens - 1}
    else
      local need = (1 - tokens) * period / cap
      wait = math.max(wait, need)
      reserves[#reserves + 1] = {group, tokens - 1, now + need}
    end
  end
end
if wait > 0 then
  check_job(job_id)  -- every key the hand-back writes (only then: a start writes none of them)
  for _, group in ipairs(full) do
    local parked = P .. 'park:' .. group
    if not redis.call('ZSCORE', parked, job_id) then
      redis.call('ZADD', parked, redis.call('INCR', P .. 'seq'), job_id)
    end
  end
  if #full == 0 then  -- a job parked for a place reserves no start: it may wait long
    for _, r in ipairs(reserves) do
      redis.call('HSET', P .. 'rate:' .. r[1], 'tokens', string.format('%.17g', r[2]),
        'at', ARGV[4])
      redis.call('ZADD', P .. 'resv:' .. r[1], string.format('%.17g', r[3]), job_id)
    end
  end
  -- handed back in the same change: no end of a run can slip in between
  local f = end_lease(job_id, token, ARGV[4])
  if f then
    local k = jk(job_id)
    local attempts = tonumber(redis.call('HGET', k, 'attempts'))
    if attempts > 0 then attempts = attempts - 1 end
    redis.call('HSET', k, 'state', 'queued', 'run_at', string.format('%.17g', now + wait),
      'attempts', attempts)
    to_queue(job_id, ARGV[4])
    wake(f[3])
  end
  return tostring(wait)
end
for i = 6, #ARGV, 4 do
  if ARGV[i + 1] ~= '' then redis.call('HSET', P .. 'lim:' .. ARGV[i], token, job_id) end
end
for _, t in ipairs(starts) do
  redis.call('HSET', P .. 'rate:' .. t[1], 'tokens', string.format('%.17g', t[2]), 'at', ARGV[4])
  redis.call('ZREM', P .. 'resv:' .. t[1], job_id)
end
return false
"""

# ARGV: P, token, now, then the groups of the concurrency limits the run held a place in
RELEASE_PLACES = r"""
local token, now = ARGV[2], ARGV[3]
for i = 4, #ARGV do
  expect(P .. 'lim:' .. ARGV[i], 'hash')
  expect(P .. 'park:' .. ARGV[i], 'zset')
end
for i = 4, #ARGV do
  redis.call('HDEL', P .. 'lim:' .. ARGV[i], token)
  local parked = P .. 'park:' .. ARGV[i]
  while true do
    local first = redis.call('ZRANGE', parked, 0, 0)[1]
    if not first then break end
    redis.call('ZREM', parked, first)
    local k = jk(first)
    if redis.call('TYPE', k)['ok'] == 'hash' then
      local f = redis.call('HMGET', k, 'state', 'queue', 'key', 'run_at')
      if f[1] == 'queued' and tonumber(f[4]) > tonumber(now) then
        check_job(first)
        leave_queue(first, f[2], f[3])
        redis.call('HSET', k, 'run_at', now)
        to_queue(first, now)
        wake(f[2])
        break
      end
    end
  end
end
"""

# ARGV: P, id
UNFINISH = r"""
check_job(ARGV[2])
if redis.call('HGET', jk(ARGV[2]), 'state') ~= 'done' then return 0 end
forget(ARGV[2])
return 1
"""

# ARGV: P, now, then ids (each requeued if dead). Returns how many were.
REQUEUE = r"""
local now = ARGV[2]
local n = 0
local woken = {}
for i = 3, #ARGV do check_job(ARGV[i]) end
for i = 3, #ARGV do
  local id = ARGV[i]
  local f = redis.call('HMGET', jk(id), 'state', 'queue')
  if f[1] == 'dead' then
    redis.call('SREM', qk(f[2], 'dead'), id)
    redis.call('HSET', jk(id), 'state', 'queued', 'attempts', 0, 'lost', 0, 'run_at', now)
    redis.call('HDEL', jk(id), 'finished_at')
    to_queue(id, now)
    woken[f[2]] = true
    n = n + 1
  end
end
for q, _ in pairs(woken) do wake(q) end
return n
"""

# ARGV: P, queue
PURGE = r"""
local q = ARGV[2]
local n = 0
local parts = {
  redis.call('ZRANGE', qk(q, 'runat'), 0, -1),
  redis.call('SMEMBERS', qk(q, 'done')),
  redis.call('SMEMBERS', qk(q, 'dead')),
  redis.call('SMEMBERS', qk(q, 'waiting')),
  redis.call('SMEMBERS', qk(q, 'aborted')),
}
check_queue(q)
for _, ids in ipairs(parts) do
  for _, id in ipairs(ids) do check_job(id) end
end
for _, ids in ipairs(parts) do
  for _, id in ipairs(ids) do
    forget(id)
    n = n + 1
  end
end
return n
"""

# ARGV: P, now, limit
EXPIRE = r"""
local gone = redis.call('ZRANGEBYSCORE', P .. 'expiry', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(gone) do check_job(id) end
for _, id in ipairs(gone) do forget(id) end
return #gone
"""

# ARGV: P, queue, now. Returns queued, delayed, running, done, dead, the oldest claimable
# job's enqueued_at (or ''), and the leases as id, lease_until pairs.
COUNTS = r"""
local q, now = ARGV[2], ARGV[3]
local oldest = ''
-- the oldest among (at most) the thousand claimable jobs due first
local firsts = redis.call('ZRANGEBYSCORE', qk(q, 'runat'), '-inf', now, 'LIMIT', 0, 1000)
for _, id in ipairs(firsts) do
  local at = redis.call('HGET', jk(id), 'enqueued_at')
  if oldest == '' or tonumber(at) < tonumber(oldest) then oldest = at end
end
return {
  redis.call('ZCARD', qk(q, 'runat')),
  redis.call('ZCOUNT', qk(q, 'runat'), '(' .. now, '+inf'),
  redis.call('ZCARD', qk(q, 'leases')),
  redis.call('SCARD', qk(q, 'done')),
  redis.call('SCARD', qk(q, 'dead')),
  oldest,
  redis.call('ZRANGE', qk(q, 'leases'), 0, -1, 'WITHSCORES'),
  redis.call('SCARD', qk(q, 'waiting')),
  redis.call('SCARD', qk(q, 'aborted')),
}
"""

# ARGV: P, queue. The earliest time a claim could find something: '' if nothing is queued or
# running, '0' if something is claimable now.
NEXT_RUN_AT = r"""
local q = ARGV[2]
if redis.call('ZCARD', qk(q, 'ready')) > 0 then return '0' end
local best = ''
for _, part in ipairs({'delayed', 'leases'}) do
  local first = redis.call('ZRANGE', qk(q, part), 0, 0, 'WITHSCORES')
  if first[2] and (best == '' or tonumber(first[2]) < tonumber(best)) then best = first[2] end
end
return best
"""

# ARGV: P, id, now, repair ('1': put it right). Checks that one job is where its state says,
# in every index of its queue; returns what was wrong (and, with repair, has been put right).
DOCTOR_JOB = r"""
local id, now, repair = ARGV[2], ARGV[3], ARGV[4] == '1'
local k = jk(id)
local said = {}
local function say(text) said[#said + 1] = 'job ' .. id .. ': ' .. text end
if redis.call('TYPE', k)['ok'] ~= 'hash' then return said end
local f = redis.call('HMGET', k, 'queue', 'state', 'key', 'priority', 'seq', 'run_at',
  'lease_until', 'keep_until', 'task')
local q, state, key = f[1], f[2], f[3]
if not (q and state and f[4] and f[5] and f[6] and f[9]) then
  say('its record lacks fields (queue, state, priority, seq, run_at or task): not a job '
    .. 'conveyor could run')
  if repair then
    if q then
      check_queue(q)
      for _, part in ipairs({'runat', 'delayed', 'leases'}) do
        redis.call('ZREM', qk(q, part), id)
      end
      redis.call('SREM', qk(q, 'done'), id)
      redis.call('SREM', qk(q, 'dead'), id)
    end
    redis.call('ZREM', P .. 'expiry', id)
    redis.call('DEL', k)
  end
  return said
end
check_queue(q)
if key then check_key(q, key) end
local m = member(id, f[4], f[5])
local placed = key and redis.call('HGET', qk(q, 'kplaced'), key) == id
local at = {
  runat = redis.call('ZSCORE', qk(q, 'runat'), id) ~= false,
  ready = redis.call('ZSCORE', qk(q, 'ready'), m) ~= false,
  delayed = redis.call('ZSCORE', qk(q, 'delayed'), id) ~= false,
  leases = redis.call('ZSCORE', qk(q, 'leases'), id) ~= false,
  done = redis.call('SISMEMBER', qk(q, 'done'), id) == 1,
  dead = redis.call('SISMEMBER', qk(q, 'dead'), id) == 1,
  waiting = redis.call('SISMEMBER', qk(q, 'waiting'), id) == 1,
  aborted = redis.call('SISMEMBER', qk(q, 'aborted'), id) == 1,
  line = key and redis.call('ZSCORE', qk(q, 'k:' .. key), id) ~= false or false,
}
local want = {runat = false, ready = false, delayed = false, leases = false, done = false,
  dead = false, waiting = false, aborted = false, line = false}
if state == 'queued' then
  want.runat = true
  if key then want.line = true end
  if not key or placed then
    local due = tonumber(f[6]) <= tonumber(now)
    -- a due job may still sit in delayed until the next claim moves it: either is right
    if at.ready or at.delayed then want.ready, want.delayed = at.ready, at.delayed
    elseif due then want.ready = true else want.delayed = true end
  end
elseif state == 'running' then
  want.leases = true
  if key and redis.call('SISMEMBER', qk(q, 'krun'), key) == 0 then
    say('running, but its key ' .. key .. ' is not marked running')
    if repair then redis.call('SADD', qk(q, 'krun'), key) end
  end
elseif state == 'done' then
  want.done = true
elseif state == 'dead' then
  want.dead = true
elseif state == 'waiting' then
  want.waiting = true
elseif state == 'aborted' then
  want.aborted = true
else
  say('its state ' .. state .. ' is none of conveyor\'s')
  if repair then
    redis.call('HSET', k, 'state', 'dead', 'finished_at', now, 'error',
      'conveyor doctor: found in state ' .. state)
  end
  state = 'dead'
  want.dead = true
end
local wrong = {}
local parts = {'runat', 'ready', 'delayed', 'leases', 'done', 'dead', 'waiting', 'aborted', 'line'}
for _, part in ipairs(parts) do
  if at[part] ~= want[part] then
    wrong[#wrong + 1] = (want[part] and 'missing from ' or 'left in ') .. part
  end
end
if #wrong == 0 then return said end
say(state .. ', but ' .. table.concat(wrong, ', '))
if not repair then return said end
-- put it where its state says, and nowhere else
for _, part in ipairs({'runat', 'delayed', 'leases'}) do redis.call('ZREM', qk(q, part), id) end
redis.call('ZREM', qk(q, 'ready'), m)
redis.call('SREM', qk(q, 'done'), id)
redis.call('SREM', qk(q, 'dead'), id)
redis.call('SREM', qk(q, 'waiting'), id)
redis.call('SREM', qk(q, 'aborted'), id)
if key then
  redis.call('ZREM', qk(q, 'k:' .. key), id)
  if placed then redis.call('HDEL', qk(q, 'kplaced'), key) end
end
if state == 'queued' then
  to_queue(id, now)
elseif state == 'waiting' then
  redis.call('SADD', qk(q, 'waiting'), id)
elseif state == 'aborted' then
  redis.call('SADD', qk(q, 'aborted'), id)
elseif state == 'running' then
  redis.call('ZADD', qk(q, 'leases'), f[7] or now, id)
elseif state == 'done' then
  redis.call('SADD', qk(q, 'done'), id)
  if f[8] then redis.call('ZADD', P .. 'expiry', f[8], id) end
else
  redis.call('SADD', qk(q, 'dead'), id)
end
if key then settle_key(q, key, now) end
wake(q)
return said
"""

# ARGV: P, queue, now, repair. Index entries of the queue that name no job of it in the state
# the index stands for, and keys marked running or placed that are not.
DOCTOR_QUEUE = r"""
local q, now, repair = ARGV[2], ARGV[3], ARGV[4] == '1'
check_queue(q)
local said = {}
local function say(text) said[#said + 1] = 'queue ' .. q .. ': ' .. text end
local function state_of(id)
  if redis.call('TYPE', jk(id))['ok'] ~= 'hash' then return nil end
  local f = redis.call('HMGET', jk(id), 'queue', 'state')
  if f[1] ~= q then return nil end
  return f[2]
end
local function sweep(part, kind, strip)
  local ids = kind == 'set' and redis.call('SMEMBERS', qk(q, part))
    or redis.call('ZRANGE', qk(q, part), 0, -1)
  for _, entry in ipairs(ids) do
    local id = strip and string.sub(entry, 24) or entry
    local state = state_of(id)
    if state == nil then  -- (a job there in another state is DOCTOR_JOB's to move)
      say(part .. ' names job ' .. id .. ', which does not exist')
      if repair then
        if kind == 'set' then redis.call('SREM', qk(q, part), entry)
        else redis.call('ZREM', qk(q, part), entry) end
      end
    end
  end
end
sweep('runat', 'zset', false)
sweep('ready', 'zset', true)
sweep('delayed', 'zset', false)
sweep('leases', 'zset', false)
sweep('done', 'set', false)
sweep('dead', 'set', false)
sweep('waiting', 'set', false)
sweep('aborted', 'set', false)
-- keys marked running: each needs a running job of that key
local running = {}
for _, id in ipairs(redis.call('ZRANGE', qk(q, 'leases'), 0, -1)) do
  local f = redis.call('HMGET', jk(id), 'state', 'key')
  if f[1] == 'running' and f[2] then running[f[2]] = true end
end
local touched = {}
for _, key in ipairs(redis.call('SMEMBERS', qk(q, 'krun'))) do
  if not running[key] then
    say('key ' .. key .. ' is marked running, but no job of it runs')
    if repair then redis.call('SREM', qk(q, 'krun'), key) touched[key] = true end
  end
end
-- keys with a placed job: it must be a queued job of that key
local kp = redis.call('HGETALL', qk(q, 'kplaced'))
for i = 1, #kp, 2 do
  local key, id = kp[i], kp[i + 1]
  local f = fields_of(id, 'state', 'key')
  if f[1] ~= 'queued' or f[2] ~= key then
    say('key ' .. key .. ' has job ' .. id .. ' placed, which is not a queued job of it')
    if repair then redis.call('HDEL', qk(q, 'kplaced'), key) touched[key] = true end
  end
end
for key, _ in pairs(touched) do
  check_key(q, key)
  settle_key(q, key, now)
end
if next(touched) then wake(q) end
return said
"""
