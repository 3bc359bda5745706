-- Give memory back after removals: Redis before 7.4 never shrinks a sorted set's hash
-- table, so an index that once held 100,000 jobs keeps a table for 100,000 after retention
-- took 90% of them (8 bytes a slot, more than its 10,000 entries' share). Copying the set
-- makes one sized for what it holds. Done when its size reaches a power of two on its way
-- down, so each entry is copied O(1) times on average and sets too small to have a table
-- (listpacks, 128 entries by default) are never copied.
-- set: the sorted set an entry just left     scratch: a key no one else uses (Keys.scratch)
local function shrink(set, scratch)
  local size = redis.call('ZCARD', set)
  if size >= 128 and bit.band(size, size - 1) == 0 then
    redis.call('ZRANGESTORE', scratch, set, 0, -1)
    redis.call('RENAME', scratch, set)
  end
end
